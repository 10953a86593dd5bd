"""What scores a trained run and what it reports: scoring datasets, metrics, adaptation
diagnostics, results files, robustness tables and the charts."""

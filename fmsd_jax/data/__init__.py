"""Data sources and grain pipelines (DESIGN.md §2: knows nothing of models)."""

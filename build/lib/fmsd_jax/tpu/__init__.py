"""Planning for TPU slices from any machine: slice topologies and their chips
(`topology`), and what a compiled program costs on them (`hlo`). The mode is
fmsd_jax/modes/plan.py."""

"""Backends: where the node agents of a plan run (local processes or a Slurm job)."""

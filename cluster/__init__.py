"""Backends that launch a planned job: local (torchrun, one node or several), Slurm (sbatch) and Ray (Ray Train
through the Job Submission API). Each hosts the same per-rank entry, launcher/entries.py."""

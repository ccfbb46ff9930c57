"""Backends that launch a planned job: local (torchrun), and later Slurm and Ray."""

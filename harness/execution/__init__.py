"""Execution: suites and their validation, planning and running jobs (local pool, Slurm, DDP), the result
store, tuning, reproduction checks and the environment record."""

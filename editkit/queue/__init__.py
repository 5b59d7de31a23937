"""The GPU-waiting job queue: `editkit queue submit | worker | list | ...` (docs/queue.md).

State lives in SQLite (store.py); GPUs are read through NVML or a fake backend (gpus.py); the
start rule is a pure function (rule.py); a worker (worker.py) starts each job through a small
runner process (runner.py) that claims the GPUs, runs the command in its own process group and
records the outcome, so a worker killed mid-job loses nothing. Slurm goes through submitit
(slurm.py).
"""

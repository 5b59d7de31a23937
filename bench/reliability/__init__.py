"""The reliability campaign: seeded, time-bounded trials of what users do to editkit by accident.

Categories (one module each): kill (SIGKILL a long job, re-run it), corrupt (flip a byte or cut a
file editkit reads), enospc (the disk fills while a job writes), flags (every command's flags with
absurd values) and app (8 clients against `editkit serve` on 127.0.0.1). Every trial's randomness
comes from `--seed` and the trial's name, so a failing case re-runs the same way.

    python -m bench.reliability --n 20 --seed 0 --out /tmp/rel --only kill,corrupt,enospc,flags,app \
        --time-budget 1800

writes `<out>/<category>.json` and `<out>/<category>.md` (trials, passed, failed, and each failing
case's commands and stderr) and `<out>/summary.md`. docs/reliability.md describes the categories.
"""

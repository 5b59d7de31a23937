"""`python -m bench.reliability`: run the chosen categories one after another within a time budget.

--n is the number of trials per case family: per job (kill, enospc), per file kind (corrupt),
per client (app: requests each of the 8 clients sends); flags runs 15 x n invocations. The ci
profile is the subset tests/test_reliability_ci.py runs (cheap jobs and files, n 1).
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib
import sys
import time
from pathlib import Path

from bench.reliability import report
from bench.reliability.core import Budget, freeze_code
from bench.reliability.jobs import Workspace

CATEGORIES = ("kill", "corrupt", "enospc", "flags", "app")
WEIGHTS = {"kill": 4, "corrupt": 3, "enospc": 1, "flags": 1.5, "app": 0.5}  # shares of the time budget
MODULES = {name: f"bench.reliability.{name}" for name in ("kill", "corrupt", "enospc", "flags")}
MODULES["app"] = "bench.reliability.app_clients"


def choices(category: str, profile: str) -> list[str]:
    """The case families of a category in a profile (names to filter with --select)."""
    from bench.reliability import profiles

    return list(getattr(profiles, profile.upper())[category])


def run_campaign(out: Path, n: int, seed: int, only: list[str], time_budget: float, profile: str = "full",
                 select: list[str] | None = None, log=print, freeze: bool = True) -> dict[str, dict]:
    """Run the categories in `only` and write their reports under out; returns their counts."""
    out.mkdir(parents=True, exist_ok=True)
    code = freeze_code(out / "work" / "code") if freeze else {"live tree": True}
    ws = Workspace(out / "work")
    budget = Budget(time_budget)
    results, t0 = {}, time.monotonic()
    for k, category in enumerate(only):
        deadline = budget.share(WEIGHTS[category], sum(WEIGHTS[c] for c in only[k:]))
        module = importlib.import_module(MODULES[category])
        names = choices(category, profile)
        if names == ["*"]:
            names = module.all_cases()
        if select:
            names = [x for x in names if any(fnmatch.fnmatch(x, pat) for pat in select)]
        started = time.monotonic()
        log(f"[reliability] {category}: {len(names)} case famil{'y' if len(names) == 1 else 'ies'}, n {n}, "
            f"{deadline - started:.0f} s")
        trials = module.run_category(ws, n, seed, deadline, out / "work" / category, names)
        meta = {"seed": seed, "n": n, "profile": profile, "cases": names, "seconds": time.monotonic() - started,
                "note": getattr(module, "NOTE", "")}
        results[category] = report.write(out, category, trials, meta)
        log(f"[reliability] {category}: {results[category]} -> {out / (category + '.md')}")
    meta = {"seed": seed, "n": n, "time_budget": time_budget, "seconds": time.monotonic() - t0, "profile": profile,
            "fixture_seconds": ws.seconds, "fixtures_failed": ws.blocked_by(), "code": code}
    log(report.summary(out, results, meta))
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.reliability", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=None, help="trials per case family (default 20; ci profile: 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="report folder (work files under OUT/work)")
    p.add_argument("--only", default=",".join(CATEGORIES), help=f"comma-separated: {','.join(CATEGORIES)}")
    p.add_argument("--time-budget", type=float, default=1800, help="seconds for the whole campaign")
    p.add_argument("--profile", choices=("full", "ci"), default="full")
    p.add_argument("--select", action="append", help="only case families matching this glob (repeatable), "
                                                      "e.g. --select 'train*' --select 'cache-shard*'")
    p.add_argument("--live", action="store_true", help="run the live tree (default: a copy of editkit/ frozen "
                                                         "at the start, so edits during the campaign do not mix in)")
    args = p.parse_args(argv)
    only = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = [c for c in only if c not in CATEGORIES]
    if unknown:
        p.error(f"--only: unknown categories {unknown}; choose from {','.join(CATEGORIES)}")
    n = args.n if args.n is not None else (1 if args.profile == "ci" else 20)
    results = run_campaign(args.out, n, args.seed, only, args.time_budget, args.profile, args.select,
                           freeze=not args.live)
    sys.exit(1 if any(c["failed"] for c in results.values()) else 0)

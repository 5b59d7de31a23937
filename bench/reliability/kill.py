"""Kill and resume: SIGKILL a long job at a seeded moment, run it again, compare with an uninterrupted run.

A trial passes when the re-run exits 0, leaves no `.tmp-*` / `.staging-*` behind, keeps the
pieces finished before the kill (same inode and mtime: not redone), resumes training from the
checkpoint that existed, and its outputs equal the reference run's (see bench.reliability.jobs).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from bench.reliability.core import (
    FixtureError,
    Trial,
    blocked,
    finish,
    kill_tree,
    round_robin,
    run,
    say,
    start,
    temp_leftovers,
    trial_rng,
    verdict,
)
from bench.reliability.jobs import JOBS, Workspace

CATEGORY = "kill"
# Kill moments are drawn from the uninterrupted run's working phase: from a little before its first
# finished piece (the seconds before are Python, torch and model loading) to the end.
WINDOW_END = 0.95


def _pieces(out: Path, job) -> dict[str, dict[str, tuple]]:
    """Piece -> {file: (inode, mtime, size)} of the job's unit files under out."""
    found: dict[str, dict[str, tuple]] = {}
    for pattern in job.units:
        for p in out.glob(pattern):
            if p.is_file() and not p.name.startswith(".tmp-"):
                rel, st = p.relative_to(out).as_posix(), p.stat()
                found.setdefault(job.unit(rel), {})[rel] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return found


def _finished_pieces(out: Path, ref: Path, job) -> dict[str, tuple]:
    """The files of pieces complete at the kill (every file the reference has for that piece exists)."""
    expected = {k: set(v) for k, v in _pieces(ref, job).items()}
    return {rel: stamp for piece, got in _pieces(out, job).items() if set(got) == expected.get(piece)
            for rel, stamp in got.items()}


def _rewritten(out: Path, before: dict[str, tuple]) -> list[str]:
    changed = []
    for rel, stamp in before.items():
        p = out / rel
        if p.is_file():
            st = p.stat()
            if (st.st_ino, st.st_mtime_ns, st.st_size) != stamp:
                changed.append(rel)
    return changed


def _checkpoints(out: Path) -> list[str]:
    root = out / "checkpoints"
    return sorted(p.name for p in root.glob("step-*") if p.is_dir()) if root.is_dir() else []


def kill_trial(ws: Workspace, job_name: str, index: int, seed: int, root: Path) -> Trial:
    job = JOBS[job_name]
    case = f"{job_name}#{index}"
    try:
        ref = ws.reference(job_name)
    except FixtureError as err:
        return blocked(CATEGORY, case, err)
    duration = ws.seconds[job_name]
    work_start = min(max(0.0, ws.work_starts.get(job_name, 0.0)), duration)
    delay = trial_rng(seed, CATEGORY, job_name, index).uniform(0.9 * work_start, WINDOW_END * duration)
    tdir = root / f"{job_name}-{index}"
    shutil.rmtree(tdir, ignore_errors=True)
    tdir.mkdir(parents=True)
    out = tdir / "out"
    argv = job.argv(ws, out)
    started = time.monotonic()
    proc = start(argv, tdir, tdir / "logs" / "first")
    while time.monotonic() - started < delay and proc.poll() is None:
        time.sleep(0.02)
    early = proc.poll() is not None
    if not early:
        kill_tree(proc.pid)
    first = finish(proc, argv, tdir, tdir / "logs" / "first", 60, started)
    pieces, checkpoints = _finished_pieces(out, ref, job), _checkpoints(out)
    trained = (out / "final").is_dir()  # killed after the run's end: the re-run has nothing to resume
    leftovers_at_kill = temp_leftovers(out)
    again = run(job.resume(ws, out), tdir, tdir / "logs" / "resume", timeout=max(300, 10 * duration))
    status, _ = verdict(again.rc, again.stderr)
    problems = []
    if again.rc != 0:
        problems.append(f"re-run: {status}")
    if leftovers := temp_leftovers(out):
        problems.append(f"left behind after the re-run: {', '.join(leftovers[:4])}")
    if again.rc == 0:
        problems += job.compare(ref, out)[:8]
        if redone := _rewritten(out, pieces):
            problems.append(f"rewrote {len(redone)} of {len(pieces)} file(s) finished before the kill, "
                            f"e.g. {redone[0]}")
        if checkpoints and not trained and job_name.startswith("train"):
            meta = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else {}
            if not meta.get("resumed_from"):
                problems.append(f"did not resume from {checkpoints[-1]} (run.json resumed_from is empty)")
    when = "the first run finished before the kill" if early else f"SIGKILL after {delay:.2f} s"
    detail = "; ".join(problems) if problems else (
        f"{when} of {duration:.1f} s (work from {work_start:.1f} s); {len(pieces)} finished file(s) kept, "
        f"{len(leftovers_at_kill)} temp file(s) at the kill cleaned")
    return Trial(CATEGORY, case, not problems, detail,
                 [f"{first.line}    # {when} (uninterrupted: {duration:.1f} s)", again.line],
                 again.tail(8) if problems else "", first.seconds + again.seconds,
                 {"delay": round(delay, 3), "duration": round(duration, 3), "work_start": round(work_start, 3),
                  "killed": not early,
                  "pieces_at_kill": len(pieces), "checkpoints_at_kill": checkpoints})


def run_category(ws: Workspace, n: int, seed: int, deadline: float, root: Path, jobs: list[str]) -> list[Trial]:
    plan = round_robin({name: [(name, i) for i in range(n)] for name in jobs})
    trials = []
    for name, i in plan:
        if time.monotonic() > deadline:
            trials.append(Trial(CATEGORY, f"{name}#{i}", None, "not run: time budget spent"))
            continue
        trials.append(say(kill_trial(ws, name, i, seed, root)))
    return trials

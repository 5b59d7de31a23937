"""Disk full: a job writes into a folder that runs out of space, then is re-run with space.

Where this machine allows it (root, or unprivileged user namespaces), the output folder is a
tmpfs of a seeded size — a seeded share of what the uninterrupted run wrote — mounted in a
private mount namespace (`unshare -m`): real ENOSPC from every writer (Python, the safetensors
Rust code, torch's C++). Elsewhere, `inject/sitecustomize.py` makes `os.replace` (the atomic-write
layer's commit) raise ENOSPC after a seeded number of calls (RELIABILITY_ENOSPC_MODE=inject forces it).

A trial passes when the full-disk run exits 2 with one line (or 0, if it fitted after all:
counted as "fit"), leaves no temporary files, every output file it left is complete (images
byte-equal and tensors equal to the uninterrupted run's, JSON readable, CSV not cut mid-line), and the re-run with space
exits 0 with outputs equal to the uninterrupted run's.

Run as `python -m bench.reliability.enospc SPEC.json` it is the part that runs inside the namespace.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.reliability import compare as cmp
from bench.reliability.core import (
    PY,
    Trial,
    blocked,
    child_env,
    round_robin,
    run,
    say,
    temp_leftovers,
    trial_rng,
    verdict,
)
from bench.reliability.corrupt import tensors_digest
from bench.reliability.jobs import JOBS, RUN_MANIFESTS, Workspace

CATEGORY = "enospc"
PAGE = 4096
INJECT = Path(__file__).with_name("inject")
_TMPFS: list[bool] = []


def tmpfs_available(probe_dir: Path) -> bool:
    """Whether `unshare -m` + `mount -t tmpfs` work here (checked once; RELIABILITY_ENOSPC_MODE=inject: no)."""
    if os.environ.get("RELIABILITY_ENOSPC_MODE") == "inject":
        return False
    if not _TMPFS:
        probe_dir.mkdir(parents=True, exist_ok=True)
        cmd = ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs '{probe_dir}'"]
        try:
            ok = subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        if not ok:
            cmd = ["unshare", "-r", *cmd[1:]]
            try:
                ok = subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                ok = False
            _TMPFS.append(ok and "-r")
        else:
            _TMPFS.append("plain")
    return bool(_TMPFS[0])


def usage(folder: Path) -> int:
    """Bytes a folder takes on a tmpfs (whole pages per file and folder)."""
    total = 0
    for p in folder.rglob("*"):
        total += PAGE * (1 + (p.stat().st_size // PAGE) if p.is_file() else 1)
    return total


def intact(out: Path, ref: Path) -> list[str]:
    """Problems with what a failed run left: partial files, files unlike the uninterrupted run's."""
    problems = []
    for rel, path in cmp.files(out, (*RUN_MANIFESTS, "fingerprint.json")).items():
        other = ref / rel
        if path.suffix == ".safetensors":
            if other.is_file() and tensors_digest(path) != tensors_digest(other):
                problems.append(f"{rel}: its tensors differ from the uninterrupted run's")
        elif path.suffix == ".png":
            if other.is_file() and path.read_bytes() != other.read_bytes():
                problems.append(f"{rel}: differs from the uninterrupted run's ({path.stat().st_size} vs "
                                f"{other.stat().st_size} bytes)")
        elif path.suffix in (".json", ".jsonl"):
            try:
                [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.suffix == ".jsonl" \
                    else json.loads(path.read_text())
            except ValueError as err:
                problems.append(f"{rel}: unreadable ({err})")
        elif path.suffix == ".csv" and other.is_file():
            text = path.read_text()
            if text and not text.endswith("\n"):
                problems.append(f"{rel}: ends mid-line")
    return problems


def _result(res) -> dict:
    return {"rc": res.rc, "stderr": res.stderr, "line": res.line, "seconds": res.seconds}


def inside(spec: dict) -> dict:
    """Mount the tmpfs, run the job into it, check, grow the tmpfs, re-run, check (in the namespace)."""
    mnt, out, ref = Path(spec["mount"]), Path(spec["out"]), Path(spec["ref"])
    job = JOBS[spec["job"]]
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={spec['size']}", "tmpfs", str(mnt)], check=True)
    logs = Path(spec["logs"])
    first = run(spec["argv"], Path(spec["cwd"]), logs / "full", timeout=spec["timeout"])
    report = {"first": _result(first), "leftovers_full": temp_leftovers(out), "after_full": intact(out, ref)}
    subprocess.run(["mount", "-o", "remount,size=2g", str(mnt)], check=True)
    again = run(spec["resume"], Path(spec["cwd"]), logs / "again", timeout=spec["timeout"])
    report["again"] = _result(again)
    report["leftovers_again"] = temp_leftovers(out)
    report["diffs"] = job.compare(ref, out)[:8] if again.rc == 0 else []
    shutil.copytree(out, Path(spec["keep"]), dirs_exist_ok=True)  # the tmpfs goes with the namespace
    return report


def _tmpfs_trial(ws, job, ref, tdir: Path, size: int, timeout: float) -> dict:
    mnt = tdir / "mnt"
    mnt.mkdir(parents=True)
    out = mnt / "out"
    spec = {"mount": str(mnt), "out": str(out), "ref": str(ref), "job": job.name, "size": size,
            "argv": [str(a) for a in job.argv(ws, out)], "resume": [str(a) for a in job.resume(ws, out)],
            "cwd": str(tdir), "logs": str(tdir / "logs"), "timeout": timeout, "keep": str(tdir / "out-after")}
    (tdir / "spec.json").write_text(json.dumps(spec, indent=1))
    unshare = ["unshare", "-m"] + (["-r"] if _TMPFS[0] == "-r" else [])
    proc = subprocess.run([*unshare, PY, "-m", "bench.reliability.enospc", str(tdir / "spec.json")], cwd=tdir,
                          capture_output=True, text=True, env=child_env(), timeout=3 * timeout + 120)
    try:
        report = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise RuntimeError(f"the namespace runner failed (exit {proc.returncode}): {proc.stderr[-800:]}") from None
    report["how"] = f"output on a {size // 1024} KiB tmpfs (unshare -m), then remounted at 2 GiB"
    report["env"] = {}
    return report


def _inject_trial(ws, job, ref, tdir: Path, after: int, timeout: float) -> dict:
    out = tdir / "out"
    env = {"PYTHONPATH": f"{INJECT}:{child_env()['PYTHONPATH']}", "RELIABILITY_ENOSPC_AFTER": str(after)}
    first = run(job.argv(ws, out), tdir, tdir / "logs" / "full", timeout=timeout, env=env)
    report = {"first": _result(first), "leftovers_full": temp_leftovers(out), "after_full": intact(out, ref)}
    again = run(job.resume(ws, out), tdir, tdir / "logs" / "again", timeout=timeout)
    report.update(again=_result(again), leftovers_again=temp_leftovers(out),
                  diffs=job.compare(ref, out)[:8] if again.rc == 0 else [],
                  how=f"os.replace raises ENOSPC after {after} call(s) (inject/sitecustomize.py)")
    return report


def enospc_trial(ws: Workspace, job_name: str, index: int, seed: int, root: Path) -> Trial:
    from bench.reliability.core import FixtureError

    case = f"{job_name}#{index}"
    job = JOBS[job_name]
    try:
        ref = ws.reference(job_name)
    except FixtureError as err:
        return blocked(CATEGORY, case, err)
    tdir = root / f"{job_name}-{index}"
    shutil.rmtree(tdir, ignore_errors=True)
    tdir.mkdir(parents=True)
    rng = trial_rng(seed, CATEGORY, job_name, index)
    timeout = max(300, 10 * ws.seconds[job_name])
    if tmpfs_available(root / ".probe"):
        size = PAGE * max(4, int(rng.uniform(0.05, 0.95) * usage(ref) / PAGE))
        report = _tmpfs_trial(ws, job, ref, tdir, size, timeout)
    else:
        n_files = len(cmp.files(ref))
        report = _inject_trial(ws, job, ref, tdir, rng.randrange(0, max(1, n_files)), timeout)
    first, again = report["first"], report["again"]
    status, ok = verdict(first["rc"], first["stderr"])
    outcome = {"ok": "fit", "user-error": "refused"}.get(status, status)
    problems = [] if ok and status != "usage-error" else [f"full disk: {status}"]
    problems += [f"left after the full-disk run: {x}" for x in report["leftovers_full"][:3]]
    problems += [f"after the full-disk run: {x}" for x in report["after_full"][:3]]
    again_status, _ = verdict(again["rc"], again["stderr"])
    if again["rc"] != 0:
        problems.append(f"re-run with space: {again_status}")
    problems += [f"left after the re-run: {x}" for x in report["leftovers_again"][:3]]
    problems += report["diffs"]
    tail = first["stderr"] if not ok else again["stderr"]
    message = [ln for ln in first["stderr"].splitlines() if ln.strip()][-1:] if status == "user-error" else []
    detail = "; ".join(problems) if problems else f"{outcome}: {report['how']}" + (
        f": {message[0][:160]}" if message else "")
    return Trial(CATEGORY, case, not problems, detail, [f"# {report['how']}", first["line"], again["line"]],
                 "\n".join([ln for ln in tail.splitlines() if ln.strip()][-8:]) if problems else "",
                 first["seconds"] + again["seconds"], {"outcome": outcome})


def run_category(ws: Workspace, n: int, seed: int, deadline: float, root: Path, names: list[str]) -> list[Trial]:
    trials = []
    for name, i in round_robin({name: [(name, i) for i in range(n)] for name in names}):
        if time.monotonic() > deadline:
            trials.append(Trial(CATEGORY, f"{name}#{i}", None, "not run: time budget spent"))
            continue
        try:
            trials.append(say(enospc_trial(ws, name, i, seed, root)))
        except RuntimeError as err:
            trials.append(say(Trial(CATEGORY, f"{name}#{i}", False, f"harness: {err}")))
    return trials


if __name__ == "__main__":
    print(json.dumps(inside(json.loads(Path(sys.argv[1]).read_text())), default=str))

"""What every category shares: running editkit as a user does, judging its exit, trials, the time budget.

A command runs in its own session (so a kill reaches torchrun's workers too) with the campaign's
environment: offline, one BLAS thread per process (the campaign shares a small machine; the
reference and the trial run under the same setting, so results stay comparable).
"""

from __future__ import annotations

import dataclasses
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
EDITKIT = [PY, "-m", "editkit"]
TRACEBACK = "Traceback (most recent call last)"
ERROR_PREFIX = "editkit: error: "
TEMP_PREFIXES = (".tmp-", ".staging-")
_CODE_PATHS: list[str] = []  # a frozen copy of editkit/ to run instead of the live tree (see freeze_code)


def child_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": os.environ.get("RELIABILITY_THREADS", "1"), "MKL_NUM_THREADS": "1",
           "GRADIO_ANALYTICS_ENABLED": "False", "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1",
           "COLUMNS": "200"}
    # the frozen copy first, then what the caller had (a nested runner inherits the copy), then the
    # repository for `bench` (last: its editkit/ must not shadow the copy)
    paths = [*_CODE_PATHS, *os.environ.get("PYTHONPATH", "").split(os.pathsep), str(ROOT)]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if p))
    env.update(extra)
    return env


def freeze_code(folder: Path) -> dict:
    """Copy editkit/ into folder and run that copy (children and this process) for the whole campaign.

    Others may edit the tree while a campaign runs; a reference made before an edit and a trial
    after it would differ for no fault of the job. Returns what was frozen (HEAD and the diff's digest).
    """
    import hashlib
    import shutil

    target = folder / "editkit"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(ROOT / "editkit", target, ignore=shutil.ignore_patterns("__pycache__"))
    _CODE_PATHS[:] = [str(folder)]
    sys.path.insert(0, str(folder))
    for name in [m for m in sys.modules if m == "editkit" or m.startswith("editkit.")]:
        del sys.modules[name]
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout  # noqa: E731
    return {"frozen_at": time.strftime("%Y-%m-%d %H:%M:%S"), "head": git("rev-parse", "HEAD").strip(),
            "diff_sha256": hashlib.sha256(git("diff", "HEAD", "--", "editkit").encode()).hexdigest()[:16],
            "copy": str(target)}


def torchrun(nproc: int) -> list[str]:
    return [PY, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
            "-m", "editkit"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shell_line(argv: list, cwd: Path | None = None, env: dict | None = None) -> str:
    """The command as one line a person can paste (the campaign's own environment left implicit)."""
    prefix = "".join(f"{k}={shlex.quote(v)} " for k, v in (env or {}).items())
    line = prefix + " ".join(shlex.quote(str(a)) for a in argv)
    return f"cd {shlex.quote(str(cwd))} && {line}" if cwd else line


@dataclasses.dataclass
class Result:
    argv: list[str]
    cwd: Path
    rc: int | None  # None: still running at the timeout (killed)
    stdout: str
    stderr: str
    seconds: float
    env: dict = dataclasses.field(default_factory=dict)

    @property
    def line(self) -> str:
        return shell_line(self.argv, self.cwd, self.env)

    def tail(self, n: int = 6) -> str:
        lines = [ln for ln in self.stderr.splitlines() if ln.strip()]
        return "\n".join(lines[-n:])


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant at once (torchrun's workers run in their own sessions)."""
    import psutil

    try:
        parent = psutil.Process(pid)
        procs = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def start(argv: list, cwd: Path, log: Path, env: dict | None = None, stdin=subprocess.DEVNULL) -> subprocess.Popen:
    """Start a command with stdout/stderr going to log.out / log.err."""
    cwd.mkdir(parents=True, exist_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    out, err = open(f"{log}.out", "w"), open(f"{log}.err", "w")
    try:
        return subprocess.Popen([str(a) for a in argv], cwd=cwd, stdout=out, stderr=err, stdin=stdin,
                                env=child_env(**(env or {})), start_new_session=True)
    finally:
        out.close()
        err.close()


def finish(proc: subprocess.Popen, argv: list, cwd: Path, log: Path, timeout: float, started: float,
           env: dict | None = None) -> Result:
    try:
        rc = proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        proc.wait()
        rc = None
    return Result([str(a) for a in argv], cwd, rc, read(f"{log}.out"), read(f"{log}.err"),
                  time.monotonic() - started, dict(env or {}))


def run(argv: list, cwd: Path, log: Path, timeout: float = 900, env: dict | None = None) -> Result:
    started = time.monotonic()
    return finish(start(argv, cwd, log, env), argv, cwd, log, timeout, started, env)


def read(path) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def verdict(rc: int | None, stderr: str) -> tuple[str, bool]:
    """How a command ended, and whether that is acceptable for a user's input:

    ok (exit 0); user-error (exit 2, one `editkit: error:` line, last on stderr); usage-error
    (exit 2, click's boxed usage message: accepted, counted apart); anything else fails:
    a traceback, another exit code, an exit 2 without one error line, or no exit (timeout).
    """
    if rc is None:
        return "timeout", False
    if TRACEBACK in stderr:
        return f"traceback (exit {rc})", False
    if rc == 0:
        return "ok", True
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(ERROR_PREFIX)]
    if rc == 2 and len(errors) == 1 and lines[-1] == errors[0]:
        return "user-error", True
    if rc == 2 and not errors and "Usage:" in stderr and "Error" in stderr:
        return "usage-error", True
    if rc == 2:
        return f"exit 2 with {len(errors)} error line(s), last line {lines[-1][:80] if lines else '(none)'!r}", False
    if rc < 0:
        return f"killed by signal {-rc}", False
    return f"exit {rc}", False


def temp_leftovers(folder: Path) -> list[str]:
    """Names of temporary files/folders (atomic-write leftovers) anywhere under folder."""
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.startswith(TEMP_PREFIXES))


def trial_rng(seed: int, *parts) -> random.Random:
    """A random stream fixed by the campaign seed and the trial's name (independent of what else runs)."""
    return random.Random(":".join(str(p) for p in (seed, *parts)))


@dataclasses.dataclass
class Trial:
    category: str
    case: str
    passed: bool | None  # None: blocked (a fixture it needs failed, or the time budget ran out)
    detail: str = ""
    commands: list[str] = dataclasses.field(default_factory=list)
    stderr_tail: str = ""
    seconds: float = 0.0
    extra: dict = dataclasses.field(default_factory=dict)


class FixtureError(Exception):
    """A fixture (a reference run) failed: the trials that need it are blocked, with its command."""

    def __init__(self, message: str, result: Result | None = None):
        super().__init__(message)
        self.result = result


def say(t: Trial) -> Trial:
    """Print one line per finished trial (the campaign takes a while)."""
    mark = {True: "pass", False: "FAIL", None: "blocked"}[t.passed]
    print(f"  {t.category} {t.case}: {mark} ({t.seconds:.0f} s) {t.detail[:160]}", flush=True)
    return t


def blocked(category: str, case: str, err: FixtureError) -> Trial:
    res = err.result
    return Trial(category, case, None, f"blocked: {err}", [res.line] if res else [], res.tail() if res else "")


class Budget:
    """A wall-clock deadline for the campaign, shared out between the categories still to run."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def share(self, weight: float, weights_left: float) -> float:
        """The deadline of the next category: its weighted share of what is left (unused time flows on)."""
        return time.monotonic() + max(0.0, self.remaining()) * weight / max(weight, weights_left)


def round_robin(groups: dict[str, list]) -> list:
    """Interleave the groups' items (a, b, c, a, b, c, ...) so a budget cut still covers every group."""
    out, lists = [], [list(v) for v in groups.values()]
    while any(lists):
        for items in lists:
            if items:
                out.append(items.pop(0))
    return out

"""Flag fuzz: every command's flags (read from the CLI itself) with absurd values, one flag at a time.

Each invocation starts from a valid command line on the tiny fixtures (BASE) and replaces one
option's or argument's value (or adds the option): 0, -1, huge, 2**70, nan, inf, '', a folder
where a file is expected, a file where a folder is, a missing path, '../x', unicode; booleans
are switched on. It passes when it exits 0, or 2 with one `editkit: error:` line (click's boxed
usage message for a value of the wrong type is accepted and counted apart as usage-error).
Invocations run in one worker process (bench.reliability.flags_worker) — editkit.cli.main
in-process — except `serve`, which runs as a subprocess (it serves until stopped: answering at
all within the timeout counts as exit 0).
"""

from __future__ import annotations

import json
import select
import shutil
import subprocess
import time
from pathlib import Path

from bench.reliability.core import (
    EDITKIT,
    PY,
    FixtureError,
    Trial,
    child_env,
    free_port,
    kill_tree,
    round_robin,
    run,
    say,
    shell_line,
    trial_rng,
    verdict,
)
from bench.reliability.jobs import SIZE, Workspace

CATEGORY = "flags"
NOTE = "usage-error = click's boxed message for a value of the wrong type (exit 2, no traceback): accepted"
PER_N = 15  # invocations per unit of --n
TIMEOUT = 180
SERVE_TIMEOUT = 60
NOT_FUZZED = {"demo": "runs the whole demo for minutes"}

E = ["--dtype", "fp32", "--device", "cpu"]
BASE = {  # a valid invocation of each command: (arguments, options); {name} are fixtures (see _fixture)
    "version": ([], []),
    "data synth": ([], ["--out", "synth", "--n", "4", "--size", str(SIZE), "--workers", "1"]),
    "data validate": (["{train}"], ["--workers", "1"]),
    "data convert": (["{train}", "converted.json"], []),
    "data build": (["{train}"], ["--out", "built", "--workers", "1"]),
    "data split": (["{train}"], ["--out", "split"]),
    "data select": (["{train}"], ["--out", "top.jsonl", "--top", "2", "--by", "n_shapes"]),
    "data mix": (["{mix}"], ["--steps", "10", "--batch-size", "2"]),
    "model save-tiny": (["tiny-model"], []),
    "model info": (["{model}"], []),
    "edit": ([], ["--image", "{src}", "--prompt", "make it blue", "--out", "edit.png", "--model", "{model}",
                  "--steps", "2", "--cfg", "1", "--width", str(SIZE), "--height", str(SIZE), *E]),
    "chat": ([], ["--image", "{src}", "--model", "{model}", "--save", "session", "--steps", "2", *E]),
    "infer": ([], ["--data", "{test}", "--out", "preds", "--model", "{model}", "--steps", "2", "--cfg", "1",
                   "--width", str(SIZE), "--height", str(SIZE), *E]),
    "lora convert": (["{lora}", "converted.safetensors"], []),
    "lora inspect": (["{lora}"], []),
    "train": (["{config}"], []),
    "cache": ([], ["--model", "{model}", "--data", "{test}", "--out", "cache", "--area", "1024", "--multiple", "16",
                   "--dtype", "fp32"]),
    "cache verify": (["{cache}"], []),
    "eval": ([], ["--pred", "{preds}", "--data", "{train_mid}", "--out", "ev", "--metrics", "pixel"]),
    "compare": (["{eval}"], ["--out", "cmp", "--n-boot", "100"]),
    "serve": ([], ["--model", "tiny", "--port", "{port}", "--device", "cpu"]),
    "queue submit": (["true"], ["--name", "fuzz", "--queue", "q"]),
    "queue list": ([], ["--queue", "q"]),
    "queue watch": ([], ["--count", "1", "--interval", "0.1", "--queue", "q"]),
    "queue show": (["1"], ["--queue", "q"]),
    "queue logs": (["1"], ["--queue", "q"]),
    "queue cancel": (["1"], ["--grace", "1", "--queue", "q"]),
    "queue retry": (["1"], ["--queue", "q"]),
    "queue clear": ([], ["--done", "--queue", "q"]),
    "queue worker": ([], ["--gpus", "none", "--exit-when-empty", "--poll", "0.1", "--queue", "q"]),
}


VALUE_NAMES = ("0", "-1", "huge", "2**70", "nan", "inf", "empty", "a-folder", "a-file", "missing", "dotdot", "unicode")


OPTIONS_FIRST = {"queue submit"}  # its argument is a whole command line: options go before `--`


def _values(scratch: Path) -> dict[str, str]:
    """The fuzz values; the folder and the file are fresh ones in the invocation's scratch folder
    (never a fixture: a fuzzed output option may write there)."""
    folder, file = scratch / "a-folder", scratch / "a-file.jsonl"
    if not folder.exists():
        folder.mkdir(parents=True)
        (folder / "note.txt").write_text("a folder given where a file is expected\n")
        file.write_text('{"id": "x", "instruction": "a file given where a folder is expected"}\n')
    return {"0": "0", "-1": "-1", "huge": "1000000000000", "2**70": str(2 ** 70), "nan": "nan", "inf": "inf",
            "empty": "", "a-folder": str(folder), "a-file": str(file), "missing": "missing/nothing.png",
            "dotdot": "../x", "unicode": "ünïcødé-編集.png"}


def commands() -> dict[str, list]:
    """Command path -> its click parameters, walked from editkit's own CLI."""
    import typer

    from editkit.cli import app

    found = {}

    def walk(path, cmd):
        if hasattr(cmd, "commands"):
            if path and any(p.name != "help" for p in cmd.params):
                found[" ".join(path)] = cmd.params
            for name, sub in cmd.commands.items():
                walk(path + (name,), sub)
        else:
            found[" ".join(path)] = cmd.params

    walk((), typer.main.get_command(app))
    return found


def all_cases() -> list[str]:
    return list(commands())


def _kind(param) -> str:
    if getattr(param, "is_flag", False):
        return "flag"
    return str(getattr(getattr(param, "type_descriptor", None), "annotation", "?"))


def plan(ws: Workspace, names: list[str], total: int, seed: int) -> tuple[list[tuple], dict[str, str]]:
    """(command, param, value name) triples, shuffled per command and interleaved; and the commands
    skipped (why)."""
    skipped, groups = {}, {}
    found = commands()
    for cmd, params in found.items():
        if cmd not in names:
            continue
        if cmd in NOT_FUZZED or cmd not in BASE:
            skipped[cmd] = NOT_FUZZED.get(cmd, "no valid base invocation in bench/reliability/flags.py BASE")
            continue
        items = []
        for p in params:
            if p.param_type_name == "option" and not p.opts:
                continue
            if _kind(p) == "flag":
                items.append((cmd, p, "on"))
            else:
                items += [(cmd, p, v) for v in VALUE_NAMES]
        trial_rng(seed, CATEGORY, cmd).shuffle(items)
        groups[cmd] = items
    for cmd in names:
        if cmd not in found:
            skipped[cmd] = "not a command of this editkit"
    return round_robin(groups)[:total], skipped


def _fixture(ws: Workspace, scratch: Path, needed: str) -> str:
    key = needed.strip("{}")
    if key == "train":
        return str(ws.data() / "train.jsonl")
    if key == "test":
        return str(ws.data() / "test.jsonl")
    if key == "train_mid":
        return str(ws.data_mid() / "train.jsonl")
    if key == "src":
        rec = json.loads((ws.data() / "train.jsonl").read_text().splitlines()[0])
        return str(ws.data() / rec["source_image"])
    if key == "model":
        return str(ws.model())
    if key == "lora":
        return str(ws.lora())
    if key == "cache":
        return str(ws.reference("cache"))
    if key == "preds":
        return str(ws.reference("infer") / "cfg-1.0")
    if key == "eval":
        return str(ws.reference("eval"))
    if key == "mix":
        return str(ws.mix_root())
    if key == "config":
        return str(ws.train_config(scratch / "run", max_steps=1))
    if key == "port":
        return str(free_port())
    raise KeyError(key)


def invocation(ws: Workspace, scratch: Path, cmd: str, param, value: str, params: list) -> list[str]:
    """The base command line with one parameter set to the fuzz value (an option missing from it is added)."""
    fill = lambda items: [_fixture(ws, scratch, a) if a.startswith("{") else a for a in items]  # noqa: E731
    args, opts = (fill(part) for part in BASE[cmd])
    fuzz = _values(scratch).get(value)
    if param.param_type_name == "argument":
        order = [p.name for p in params if p.param_type_name == "argument"].index(param.name)
        args = [*args, *[""] * (order + 1 - len(args))]
        args[order] = fuzz
    elif value == "on":
        opts += [] if set(param.opts) & set(opts) else [max(param.opts, key=len)]
    else:
        at = next((i for i, a in enumerate(opts) if a in param.opts), None)
        if at is None:
            opts += [max(param.opts, key=len), fuzz]
        else:
            opts[at + 1] = fuzz
    if cmd in OPTIONS_FIRST:
        return [*cmd.split(), *opts, "--", *args]
    return [*cmd.split(), *args, *opts]


class Worker:
    """One long-lived process running invocations in-process (restarted after a timeout)."""

    def __init__(self, log: Path):
        self.log, self.proc = log, None

    def _start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        err = open(self.log, "a")
        env = child_env(EDITKIT_QUEUE=str(self.log.parent / "default-queue"))  # never the user's own queue
        # not started in the repository: `python -m` puts its folder first on sys.path, before a frozen copy
        self.proc = subprocess.Popen([PY, "-m", "bench.reliability.flags_worker"], cwd=self.log.parent,
                                     stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=err, text=True, env=env,
                                     start_new_session=True)
        err.close()

    def call(self, argv: list[str], cwd: Path, timeout: float) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(json.dumps({"argv": argv, "cwd": str(cwd)}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.stop()
            return {"rc": None, "stdout": "", "stderr": f"(no answer within {timeout:.0f} s; worker restarted)"}
        return json.loads(line)

    def stop(self) -> None:
        if self.proc is not None:
            kill_tree(self.proc.pid)
            self.proc = None


def fuzz_trial(ws: Workspace, worker: Worker, k: int, cmd: str, param, value: str, params: list,
               root: Path) -> Trial:
    opt = max(param.opts, key=len) if param.param_type_name == "option" else f"<{param.name}>"
    case = f"{cmd}#{k}"
    scratch = root / f"{k:04d}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        argv = invocation(ws, scratch, cmd, param, value, params)
    except FixtureError as err:
        res = err.result
        return Trial(CATEGORY, case, None, f"blocked: {err}", [res.line] if res else [], res.tail() if res else "")
    started = time.monotonic()
    if cmd == "serve":
        res = run([*EDITKIT, *argv], scratch, scratch / "log", timeout=SERVE_TIMEOUT,
                  env={"EDITKIT_QUEUE": str(root / "default-queue")})
        answer = {"rc": 0 if res.rc is None and "open http" in res.stdout else res.rc, "stdout": res.stdout,
                  "stderr": res.stderr}
    else:
        answer = worker.call(argv, scratch, TIMEOUT)
    status, ok = verdict(answer["rc"], answer["stderr"])
    lines = [ln for ln in answer["stderr"].splitlines() if ln.strip()]
    shown = f": {lines[-1][:160]}" if status == "user-error" else ""
    detail = f"{opt}={value!s} -> {status}{shown}"
    return Trial(CATEGORY, case, ok, detail, [shell_line([*EDITKIT, *argv], scratch)], "\n".join(lines[-8:]) if not ok
                 else "", time.monotonic() - started, {"outcome": status.split(" (")[0], "option": opt, "value": value})


def run_category(ws: Workspace, n: int, seed: int, deadline: float, root: Path, names: list[str]) -> list[Trial]:
    items, skipped = plan(ws, names, PER_N * n, seed)
    found = commands()
    worker = Worker(root / "worker.log")
    trials = [Trial(CATEGORY, f"{cmd}#skipped", None, f"not fuzzed: {why}") for cmd, why in skipped.items()]
    try:
        for k, (cmd, param, value) in enumerate(items):
            if time.monotonic() > deadline:
                trials.append(Trial(CATEGORY, f"{cmd}#{k}", None, "not run: time budget spent"))
                continue
            trials.append(say(fuzz_trial(ws, worker, k, cmd, param, value, found[cmd], root)))
    finally:
        worker.stop()
    return trials


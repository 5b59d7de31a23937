"""The app under load: 8 clients against the served tiny model on 127.0.0.1 (bench.reliability.app_server).

Each client (its own gradio_client session) sends n requests of seeded kinds: normal edits, the
same upload as everyone else, an image over the side limit, a file over the size limit (a raw
upload: gradio_client refuses it before sending), a non-image, absurd settings, and a request
cancelled while it waits. Every request must be answered — a result image, or an error message
for the bad ones — within the timeout. Then the order check: 8 clients queue one edit each, one
after another (each waits until the server has queued the previous one); the server's log must
show them run in that order. The server's RSS after all that may exceed its RSS after a first
edit by at most MEMORY_SLACK. Server-side tracebacks other than Gradio's own input errors fail.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from bench.reliability.core import PY, Trial, finish, free_port, kill_tree, read, say, start, trial_rng

CATEGORY = "app"
NOTE = "one trial per request; plus queue order, memory and the server's log"
CLIENTS = 8
REQUEST_TIMEOUT = 300
STARTUP_TIMEOUT = 300
MEMORY_SLACK = (200 * 2**20, 0.5)  # bytes, share of the RSS after warm-up: the larger bound applies
KINDS = ("edit", "identical", "huge-side", "huge-file", "non-image", "absurd", "cancel")
ABSURD = {"steps": {"steps": 10**9}, "cfg": {"cfg": -5.0}, "seed": {"seed": -1}, "width": {"width": 17, "height": 17},
          "cfg-huge": {"cfg": 1e308}, "long-prompt": {"prompt": "x" * 5000}, "fusion": {"fusion": "bogus"},
          "fusion-without-mask": {"fusion": "pixel-mask"}}


def all_cases() -> list[str]:
    return list(KINDS)


def _images(root: Path) -> dict[str, Path]:
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    files = {}
    for c in range(CLIENTS):
        files[f"own-{c}"] = root / f"client-{c}.png"
        Image.fromarray(np.random.default_rng(c).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(files[f"own-{c}"])
    files["shared"] = root / "shared.png"
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(files["shared"])
    files["wide"] = root / "wide.png"
    Image.new("RGB", (4096, 64)).save(files["wide"])
    files["non-image"] = root / "not-an-image.png"
    files["non-image"].write_text("this is text, not a PNG\n")
    files["big"] = root / "big.png"
    files["big"].write_bytes(os.urandom(3 * 2**20))
    return files


class Session:
    """One browser tab: a gradio_client Client with its own session state on the server."""

    def __init__(self, url: str, downloads: Path):
        from gradio_client import Client

        self.url = url
        self.client = Client(url, verbose=False, download_files=str(downloads))
        self.has_source = False

    def sources(self, path: Path):
        from gradio_client import handle_file

        job = self.client.submit([handle_file(str(path))], api_name="/on_sources")
        out = job.result(timeout=REQUEST_TIMEOUT)
        self.has_source = True
        return out

    def submit_edit(self, prompt: str, steps: int = 2, cfg: float = 1.0, seed: int = 0, width: int = 0,
                    height: int = 0, fusion: str = "off"):
        return self.client.submit(None, None, prompt, "", cfg, steps, seed, width, height, fusion, api_name="/on_edit")

    def edit(self, prompt: str, **settings):
        return self.submit_edit(prompt, **settings).result(timeout=REQUEST_TIMEOUT)


def _result_image(out) -> str:
    """The result image path of an /on_edit answer, checked to decode ('' when there is none)."""
    from PIL import Image

    path = out[1] if isinstance(out, (list, tuple)) and len(out) > 1 else None
    path = path.get("path") if isinstance(path, dict) else path
    if not path or not Path(path).is_file():
        return ""
    with Image.open(path) as img:
        img.load()
    return path


def _expect_error(fn, *words: str) -> tuple[bool, str]:
    """Run fn; passes when the app answers with an error message containing one of words."""
    from gradio_client.exceptions import AppError

    try:
        out = fn()
    except AppError as err:
        msg = str(err).strip()
        return (not words or any(w.lower() in msg.lower() for w in words)), f"error: {msg[:160]}"
    except Exception as err:  # a connection error, a timeout: not answered
        return False, f"{type(err).__name__}: {str(err)[:160]}"
    return False, f"accepted (no error): {str(out)[:120]}"


def request(kind: str, s: Session, c: int, j: int, files: dict, rng, url: str) -> tuple[bool, str]:
    """One request of `kind` from client c; (passed, what happened)."""
    if kind in ("edit", "identical", "cancel", "absurd") and (kind == "identical" or not s.has_source):
        s.sources(files["shared" if kind == "identical" else f"own-{c}"])
    if kind in ("edit", "identical"):
        out = s.edit(f"client {c} request {j}: make it blue", cfg=rng.choice([1.0, 4.0]), seed=rng.randrange(1000))
        path = _result_image(out)
        return bool(path), f"result {Path(path).name}" if path else f"no result image in {str(out)[:160]}"
    if kind == "huge-side":
        return _expect_error(lambda: s.sources(files["wide"]), "limit")
    if kind == "non-image":
        return _expect_error(lambda: s.sources(files["non-image"]), "image")
    if kind == "huge-file":
        import httpx

        with open(files["big"], "rb") as f:
            r = httpx.post(f"{url}/gradio_api/upload", files={"files": ("big.png", f, "image/png")},
                           timeout=REQUEST_TIMEOUT)
        return r.status_code in (400, 413), f"upload of 3 MB (limit 2 MB): HTTP {r.status_code} {r.text[:120]}"
    if kind == "absurd":
        name = rng.choice(sorted(ABSURD))
        settings = dict(ABSURD[name])
        prompt = settings.pop("prompt", f"client {c} absurd {name}")
        ok, what = _expect_error(lambda: s.edit(prompt, **settings))
        return ok, f"{name}: {what}"
    if kind == "cancel":
        job = s.submit_edit(f"client {c} request {j}: cancelled")
        time.sleep(rng.uniform(0, 0.5))
        job.cancel()
        out = s.edit(f"client {c} request {j}: after a cancel")
        path = _result_image(out)
        return bool(path), "cancelled one, the next edit answered" if path else "no result after a cancel"
    raise ValueError(kind)


def _client_loop(c: int, n: int, kinds: list[str], url: str, files: dict, root: Path, seed: int,
                 trials: list, lock: threading.Lock) -> None:
    rng = trial_rng(seed, CATEGORY, "client", c)
    try:
        s = Session(url, root / "downloads" / f"c{c}")
    except Exception as err:
        with lock:
            trials.append(Trial(CATEGORY, f"connect#c{c}", False, f"cannot connect: {type(err).__name__}: {err}"))
        return
    for j in range(n):
        kind = rng.choice(kinds)
        started = time.monotonic()
        try:
            ok, what = request(kind, s, c, j, files, rng, url)
        except Exception as err:  # not answered: timeouts, connection errors, unexpected errors
            ok, what = False, f"{type(err).__name__}: {str(err)[:200]}"
        trial = Trial(CATEGORY, f"{kind}#c{c}-{j}", ok, what, [f"client {c} request {j}: {kind}"],
                      seconds=time.monotonic() - started)
        with lock:
            trials.append(say(trial))


def _queue_order(url: str, root: Path, files: dict, log: Path) -> Trial:
    from gradio_client.utils import Status

    queued = {Status.IN_QUEUE, Status.PROCESSING, Status.PROGRESS, Status.ITERATING, Status.FINISHED}
    started = time.monotonic()
    sessions = [Session(url, root / "downloads" / f"order{k}") for k in range(CLIENTS)]
    for k, s in enumerate(sessions):
        s.sources(files[f"own-{k}"])
    jobs = []
    for k, s in enumerate(sessions):
        jobs.append(s.submit_edit(f"order-{k}"))
        deadline = time.monotonic() + REQUEST_TIMEOUT
        while jobs[-1].status().code not in queued and time.monotonic() < deadline:
            time.sleep(0.02)
    answered = [bool(_result_image(j.result(timeout=REQUEST_TIMEOUT))) for j in jobs]
    ran = [p for line in read(log).splitlines() if line.strip() for p in json.loads(line)["prompts"]
           if p.startswith("order-")]
    expected = [f"order-{k}" for k in range(CLIENTS)]
    ok = ran == expected and all(answered)
    return Trial(CATEGORY, "queue-order", ok, f"submitted {expected}, ran {ran}; {sum(answered)}/{CLIENTS} answered",
                 seconds=time.monotonic() - started)


def _server_log_trial(err_text: str) -> Trial:
    """Tracebacks in the server's stderr, apart from Gradio's own input checks (gradio.exceptions.Error)."""
    blocks = err_text.split("Traceback (most recent call last)")[1:]
    finals = [next((ln for ln in reversed(b.strip().splitlines()) if ln.strip() and not ln.startswith(" ")), "?")
              for b in blocks]
    bad = [f for f in finals if not f.startswith("gradio.exceptions.Error")]
    return Trial(CATEGORY, "server-log", not bad, f"{len(blocks)} traceback(s) in the server's stderr, "
                 f"{len(bad)} not Gradio input errors" + (f": {bad[0][:160]}" if bad else ""),
                 stderr_tail="\n".join(bad[:5]))


def run_category(ws, n: int, seed: int, deadline: float, root: Path, names: list[str]) -> list[Trial]:
    import psutil

    root.mkdir(parents=True, exist_ok=True)
    files = _images(root / "uploads")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = root / "edits.jsonl"
    log.unlink(missing_ok=True)
    argv = [PY, "-m", "bench.reliability.app_server", "--port", str(port), "--log", log, "--model", "tiny"]
    started = time.monotonic()
    proc = start(argv, root, root / "server", env={"GRADIO_TEMP_DIR": str(root / "server-tmp")})
    trials: list[Trial] = []
    try:
        while "READY" not in read(root / "server.out") and proc.poll() is None:
            if time.monotonic() - started > STARTUP_TIMEOUT:
                break
            time.sleep(0.5)
        if "READY" not in read(root / "server.out"):
            err = read(root / "server.err")
            return [Trial(CATEGORY, "startup", False, "the server did not start", [" ".join(map(str, argv))],
                          "\n".join(err.strip().splitlines()[-8:]))]
        server = psutil.Process(proc.pid)
        warm = Session(url, root / "downloads" / "warm")
        warm.sources(files["own-0"])
        warm.edit("warm up")
        rss_before = server.memory_info().rss
        kinds = [k for k in names if k in KINDS]
        lock = threading.Lock()
        threads = [threading.Thread(target=_client_loop, args=(c, n, kinds, url, files, root, seed, trials, lock))
                   for c in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        trials.append(say(_queue_order(url, root, files, log)))
        requests = len(trials) - 1 + CLIENTS  # the storm, and the order check's edits
        rss_after = server.memory_info().rss
        allowed = rss_before + max(MEMORY_SLACK[0], MEMORY_SLACK[1] * rss_before)
        trials.append(say(Trial(CATEGORY, "memory", rss_after <= allowed,
                                f"server RSS {rss_before / 2**20:.0f} MiB after warm-up, {rss_after / 2**20:.0f} MiB "
                                f"after {requests} more requests (allowed {allowed / 2**20:.0f} MiB)",
                                extra={"rss_before": rss_before, "rss_after": rss_after})))
        alive = proc.poll() is None
        state = "still serving" if alive else f"exited {proc.poll()}"
        trials.append(say(Trial(CATEGORY, "server-alive", alive, state)))
    finally:
        kill_tree(proc.pid)
        finish(proc, argv, root, root / "server", 30, started)
    trials.append(say(_server_log_trial(read(root / "server.err"))))
    return trials

"""The web app as `editkit serve` builds it, for bench.reliability.app_clients, on 127.0.0.1 only.

The one difference: the engine is wrapped so that every edit appends its prompt to a JSON-lines
log as it starts — the order the app's GPU queue actually ran the requests in.

    python -m bench.reliability.app_server --port P --log edits.jsonl [--model tiny]
"""

from __future__ import annotations

import argparse
import json
import threading
import time


class RecordingEngine:
    """The real engine; `edit` first logs its prompts (one line per call, flushed)."""

    def __init__(self, engine, log_path: str):
        self.engine = engine
        self.log = open(log_path, "a", buffering=1)
        self.lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def edit(self, requests, *args, **kwargs):
        with self.lock:
            self.log.write(json.dumps({"t": time.time(), "prompts": [r.prompt for r in requests]}) + "\n")
        return self.engine.edit(requests, *args, **kwargs)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tiny")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--max-file-mb", type=int, default=2)
    p.add_argument("--max-image-side", type=int, default=256)
    args = p.parse_args()
    from editkit.app.limits import AppLimits
    from editkit.app.server import build_controller, launch

    limits = AppLimits(max_image_side=args.max_image_side, max_file_mb=args.max_file_mb)
    controller = build_controller(args.model, [], limits=limits, device="cpu", dtype="fp32")
    controller.engine = RecordingEngine(controller.engine, args.log)
    launch(controller, host="127.0.0.1", port=args.port, block=False)
    print(f"READY http://127.0.0.1:{args.port}", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()

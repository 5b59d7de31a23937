"""Runs editkit commands in this one process, one JSON line of argv at a time (for bench.reliability.flags).

Starting Python with torch takes seconds; the fuzz runs hundreds of invocations, so they share one
process. Each reads an empty stdin, runs in its own folder, and reports {rc, stdout, stderr} as
one JSON line on the original stdout (fd 1 itself goes to /dev/null, so nothing else can mix in).
An exception that escapes `editkit.cli.main` is reported as exit 1 with its traceback, as the
`editkit` command would print it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import traceback


def main() -> None:
    jobs = os.fdopen(os.dup(0), "r")
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    quiet = os.open(os.devnull, os.O_WRONLY)
    os.dup2(quiet, 1)
    from editkit.cli import main as editkit_main

    for line in jobs:
        job = json.loads(line)
        os.chdir(job["cwd"])
        out, err = io.StringIO(), io.StringIO()
        sys.argv = ["editkit", *job["argv"]]
        sys.stdin = io.StringIO("")
        rc = 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                editkit_main(job["argv"])
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                if isinstance(exc.code, str):
                    err.write(exc.code + "\n")
            except BaseException:  # what a user would see as a traceback
                rc = 1
                err.write(traceback.format_exc())
        answers.write(json.dumps({"rc": rc, "stdout": out.getvalue()[-4000:], "stderr": err.getvalue()[-8000:]}) + "\n")


if __name__ == "__main__":
    main()

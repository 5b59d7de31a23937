"""Processes by identity: is the process we started still the one with that pid, and ending a
process group.

A pid alone is not enough after a reboot or a long night (pids are reused), so the queue
records an identity: the boot id plus the process start time from /proc (Linux). Where /proc
is absent the identity is "" and liveness falls back to `kill(pid, 0)`.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

_PROC = Path("/proc")


def _boot_id() -> str:
    try:
        return (_PROC / "sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state first), None if absent."""
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def identity(pid: int) -> str | None:
    """The pid's identity ("boot:start"), "" without /proc, None when it is gone or a zombie."""
    if not _PROC.joinpath("self").exists():
        return "" if _exists(pid) else None
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None
    return f"{_boot_id()}:{fields[19]}"


def alive(pid: int | None, ident: str | None) -> bool:
    """Whether the process recorded as (pid, ident) still runs."""
    if not pid:
        return False
    now = identity(pid)
    if now is None:
        return False
    return now == ident or not ident or not now


def _same_boot(ident: str | None) -> bool:
    return not ident or ":" not in ident or ident.split(":", 1)[0] == _boot_id()


def group_alive(pgid: int | None, ident: str | None) -> bool:
    """Whether the process group led by the recorded process still has live members.

    After a reboot nothing of ours survives, whatever now uses that number."""
    if not pgid or not _same_boot(ident):
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if _PROC.joinpath("self").exists():
        return any(_member_alive(p, pgid) for p in _PROC.iterdir() if p.name.isdigit())
    return True


def _member_alive(entry: Path, pgid: int) -> bool:
    fields = _stat_fields(int(entry.name))
    return fields is not None and fields[0] not in ("Z", "X") and fields[2] == str(pgid)


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def end_group(pgid: int | None, ident: str | None, grace_s: float, poll_s: float = 0.05) -> bool:
    """SIGTERM the group, SIGKILL what is left after grace_s; True when it is gone."""
    if not group_alive(pgid, ident):
        return True
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, max(grace_s, 5.0))):
        signal_group(pgid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not group_alive(pgid, ident):
                return True
            time.sleep(poll_s)
    return not group_alive(pgid, ident)

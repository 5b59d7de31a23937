"""JSON and Markdown reports: per category a table (trials, passed, failed, blocked) and every failure's
commands and stderr; a summary over the categories."""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

from bench.reliability.core import Trial


def group_of(case: str) -> str:
    """The case family a trial belongs to: its name up to '#' (the trial number)."""
    return re.split(r"#", case, maxsplit=1)[0]


def counts(trials: list[Trial]) -> dict[str, int]:
    return {"trials": len(trials), "passed": sum(t.passed is True for t in trials),
            "failed": sum(t.passed is False for t in trials), "blocked": sum(t.passed is None for t in trials)}


def _row(name: str, c: dict) -> str:
    return f"| {name} | {c['trials']} | {c['passed']} | {c['failed']} | {c['blocked']} |"


def markdown(category: str, trials: list[Trial], meta: dict) -> str:
    lines = [f"# reliability: {category}", "", f"seed {meta.get('seed')}, n {meta.get('n')}, "
             f"{meta.get('seconds', 0):.0f} s; {meta.get('note', '')}".rstrip("; "), "",
             "| case | trials | passed | failed | blocked |", "|---|---|---|---|---|"]
    groups = defaultdict(list)
    for t in trials:
        groups[group_of(t.case)].append(t)
    for name, items in groups.items():
        lines.append(_row(name, counts(items)))
    lines.append(_row("**all**", counts(trials)))
    outcomes = Counter(t.extra.get("outcome") for t in trials if t.extra.get("outcome"))
    if outcomes:
        lines += ["", "Outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))]
    failed = [t for t in trials if t.passed is False]
    if failed:
        lines += ["", "## Failures", ""]
        for t in failed:
            lines += [f"### {t.case}", "", t.detail, "", "```", *t.commands, "```"]
            if t.stderr_tail:
                lines += ["stderr (last lines):", "```", t.stderr_tail, "```"]
            lines.append("")
    stopped = [t for t in trials if t.passed is None]
    if stopped:
        lines += ["", "## Blocked / not run", ""]
        reasons = Counter(t.detail for t in stopped)
        for reason, k in reasons.items():
            example = next(t for t in stopped if t.detail == reason)
            lines.append(f"- {k} x {reason}" + (f" — `{example.commands[0]}`" if example.commands else ""))
            if example.stderr_tail:
                lines += ["  ```", *["  " + ln for ln in example.stderr_tail.splitlines()], "  ```"]
    return "\n".join(lines) + "\n"


def write(out: Path, category: str, trials: list[Trial], meta: dict) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    c = counts(trials)
    (out / f"{category}.json").write_text(json.dumps(
        {"category": category, **meta, **c, "trials_list": [dataclasses.asdict(t) for t in trials]},
        indent=1, default=str) + "\n")
    (out / f"{category}.md").write_text(markdown(category, trials, meta))
    return c


def summary(out: Path, results: dict[str, dict], meta: dict) -> str:
    lines = ["# reliability campaign", "", f"seed {meta['seed']}, n {meta['n']}, budget {meta['time_budget']} s, "
             f"took {meta['seconds']:.0f} s; code: {meta.get('code')}", "",
             "| category | trials | passed | failed | blocked |",
             "|---|---|---|---|---|"]
    for name, c in results.items():
        lines.append(_row(f"[{name}]({name}.md)", c))
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps({**meta, "categories": results}, indent=1) + "\n")
    return text

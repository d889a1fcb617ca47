"""The record of mutation runs (``tests/mutants.py --record PATH``) and the page made from it.

The record is a JSON object ``{mutant name: result}``; each result holds the status (killed /
survived / error), the seconds its tests took, the runner's detail (the first failing test node),
the date, the command, and a fingerprint of the mutation (file, find, replace, tests), so that a
changed mutant (or one not killed) is run again by ``--resume`` and marked stale on the page. It is rewritten
atomically after every mutant: an interrupted run keeps what it measured.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mutant_list import Mutant


def fingerprint(m: Mutant) -> str:
    text = json.dumps([m.file, m.find, m.replace, list(m.tests)])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def load(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    record = json.loads(path.read_text())
    if not isinstance(record, dict):
        raise ValueError(f"{path}: a mutation record is a JSON object, got {type(record).__name__}")
    return record


def store(path: Path, m: Mutant, result: dict) -> None:
    """Merge ``result`` (of mutant ``m``) into the record at ``path``, written atomically."""
    record = load(path)
    record[m.name] = {**result, "fingerprint": fingerprint(m)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def is_current(record: dict[str, dict], m: Mutant) -> bool:
    """Whether ``record`` holds a result of ``m`` as it is now (same mutation, same tests)."""
    entry = record.get(m.name)
    return entry is not None and entry.get("fingerprint") == fingerprint(m)


def is_killed(record: dict[str, dict], m: Mutant) -> bool:
    """Whether ``record`` shows ``m``, as it is now, killed (``--resume`` skips it)."""
    return is_current(record, m) and record[m.name]["status"] == "killed"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _caught_by(entry: dict) -> str:
    detail = entry["detail"]
    if entry["status"] != "killed":
        return f"**{entry['status']}**: {_cell(detail)}"
    for prefix in ("FAILED ", "ERROR "):
        if detail.startswith(prefix):
            return f"`{_cell(detail.removeprefix(prefix))}`" + (" (collection)" if prefix == "ERROR " else "")
    return _cell(detail)


def markdown(mutants: list[Mutant], record: dict[str, dict], source: str) -> str:
    """The page: one row per mutant of ``mutants`` with its recorded result (or "not run")."""
    rows, counts, total, dates, commands = [], {}, 0.0, set(), []
    for m in mutants:
        entry = record.get(m.name)
        if entry is None:
            status, caught, seconds = "not run", "not run", ""
        else:
            status = entry["status"] if is_current(record, m) else "stale"
            caught = _caught_by(entry) + ("" if status != "stale" else " (stale: the mutant changed since)")
            seconds = f"{entry['seconds']:.1f}"
            total += entry["seconds"]
            dates.add(entry["date"])
            if entry["command"] not in commands:
                commands.append(entry["command"])
        counts[status] = counts.get(status, 0) + 1
        rows.append(f"| {m.name} | `{m.file}` | {_cell(m.notice)} | {caught} | {seconds} |")
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    when = " to ".join(sorted(dates)[:: max(1, len(dates) - 1)]) if dates else "never"
    lines = [
        "# Mutation check",
        "",
        "Each row is one curated mutation of `tests/mutant_list.py`: a one-line bug a user would notice,",
        "applied alone to a copy of the repository, with the tests it names run against it",
        "(`python -m pytest -x` on those node ids). *Killed by* is the first test that failed.",
        "",
        f"{len(mutants)} mutants: {summary}. Sum of the mutants' test times: {total:.0f} s "
        f"({total / 60:.1f} min) of wall time on the shared 2-core development machine (noisy: others",
        f"were working), run {when}.",
        "",
        "Run with:",
        "",
        "```bash",
        *commands,
        "```",
        "",
        f"This page is generated from the record `{source}` (no tests run):",
        "",
        "```bash",
        f"python tests/mutants.py --record {source} --markdown docs/mutants.md",
        "```",
        "",
        "| mutant | file | what a user would notice | killed by | seconds |",
        "|---|---|---|---|---:|",
        *rows,
        "",
    ]
    return "\n".join(lines)

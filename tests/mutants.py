"""Mutation check: does the test suite catch the bugs a user would notice?

    python tests/mutants.py                 # every mutant of tests/mutant_list.py
    python tests/mutants.py --only NAME     # one (repeatable)
    python tests/mutants.py --list          # what there is
    python tests/mutants.py --baseline      # also check each mutant's tests pass unmutated first
    python tests/mutants.py --record docs/mutants.json [--resume]   # keep results; resume: skip the killed
    python tests/mutants.py --markdown docs/mutants.md              # the page of that record; no tests run

The repository (tracked and untracked-but-not-ignored files) is copied to a temporary directory
once; each mutant then replaces one exact text in one file of the copy, runs only the tests it
names there (``python -m pytest -x``, ``PYTHONPATH`` at the copy, no bytecode written), and
restores the file. The working tree is never touched. A mutant is *killed* when its tests fail
(or cannot even be collected: the mutation broke an import), *survived* when they pass, and an
*error* when it cannot be applied (its text is not in the file exactly once) or its tests do not
exist. A pytest that dies of a signal (the mutation crashed the interpreter) counts as killed.
Exit status: 0 when every mutant was killed, 1 otherwise.

Not collected by the default test command (pytest collects ``test_*.py`` only). Add mutants in
``tests/mutant_list.py``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:  # imported as tests.mutants (tests/test_mutants.py)
    from . import mutant_record
    from .mutant_list import MUTANTS, Mutant
except ImportError:  # run as a script: python tests/mutants.py
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import mutant_record
    from mutant_list import MUTANTS, Mutant

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RECORD = Path("docs/mutants.json")


def _repo_files(root: Path) -> list[Path]:
    """Files to copy: what git tracks plus untracked files it does not ignore (so new tests count)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root,
            capture_output=True,
            check=True,
        ).stdout
        return [Path(p) for p in out.decode().split("\0") if p and (root / p).is_file()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: everything but caches
        skip = {
            ".git",
            "__pycache__",
            ".pytest_cache",
            ".ruff_cache",
            ".hypothesis",
            ".venv",
            ".ci-venv",
            "build",
        }
        return [
            p.relative_to(root)
            for p in root.rglob("*")
            if p.is_file() and not skip.intersection(p.relative_to(root).parts)
        ]


def copy_repo(source: Path, dest: Path) -> None:
    for rel in _repo_files(source):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / rel, dest / rel)


def _env(copy: Path) -> dict[str, str]:
    # No bytecode: a mutated and a restored file can share size and mtime second, and Python would
    # then reuse the mutant's cached bytecode for the restored source.
    return {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}


def check_copy_is_imported(copy: Path) -> None:
    """Fail loudly if an installed copy of the package would shadow the mutated one."""
    out = subprocess.run(
        [sys.executable, "-c", "import ptpeft_kernels; print(ptpeft_kernels.__file__)"],
        cwd=copy,
        env=_env(copy),
        capture_output=True,
        text=True,
    )
    where = out.stdout.strip()
    if out.returncode or not Path(where).resolve().is_relative_to(copy.resolve()):
        raise SystemExit(
            f"mutants: the copy's ptpeft_kernels is not the one imported ({where or out.stderr})"
        )


def _first_failure(output: str) -> str:
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" - ")[0]
    return ""


def _pytest(m: Mutant, copy: Path, timeout: float, pytest_args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *pytest_args, *m.tests],
        cwd=copy,
        env=_env(copy),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_mutant(
    m: Mutant, copy: Path, timeout: float, pytest_args: list[str], baseline: bool = False
) -> tuple[str, float, str]:
    """(status, seconds, detail) of one mutant, applied to ``copy`` and undone afterwards.

    ``baseline``: first run its tests on the unmutated copy; a failure there is an error (a
    mutant killed by tests that fail anyway proves nothing).
    """
    path = copy / m.file
    if not path.is_file():
        return "error", 0.0, f"no file {m.file}"
    original = path.read_text()
    count = original.count(m.find)
    if count != 1:
        return "error", 0.0, f"the text to replace occurs {count} times in {m.file} (needs exactly 1)"
    missing = [t for t in m.tests if not (copy / t.split("::")[0]).is_file()]
    if missing:
        return "error", 0.0, f"no test file {missing}"
    if baseline:
        try:
            clean = _pytest(m, copy, timeout, pytest_args)
        except subprocess.TimeoutExpired:
            return "error", 0.0, f"unmutated, its tests time out after {timeout:.0f} s"
        if clean.returncode != 0:
            out = clean.stdout + clean.stderr
            return (
                "error",
                0.0,
                f"unmutated, its tests fail: {_first_failure(out) or f'exit {clean.returncode}'}",
            )
    path.write_text(original.replace(m.find, m.replace))
    start = time.perf_counter()
    try:
        proc = _pytest(m, copy, timeout, pytest_args)
    except subprocess.TimeoutExpired:
        return "killed", time.perf_counter() - start, f"timed out after {timeout:.0f} s"
    finally:
        path.write_text(original)
    seconds = time.perf_counter() - start
    output = proc.stdout + proc.stderr
    if proc.returncode == 0:
        return "survived", seconds, "all named tests passed"
    if proc.returncode == 1:
        return "killed", seconds, _first_failure(output) or "tests failed"
    if proc.returncode == 2:  # interrupted: collection errors (an import the mutation broke)
        return "killed", seconds, _first_failure(output) or "collection failed"
    if proc.returncode < 0:  # the mutation crashed the interpreter (SIGFPE, SIGSEGV): a user notices
        return "killed", seconds, f"pytest died of {_signal_name(-proc.returncode)}"
    if _first_failure(output):  # a test failed, then pytest itself broke (exit 3: e.g. a hung worker's
        return "killed", seconds, _first_failure(output)  # unraisable exception at exit)
    tail = output.strip().splitlines()[-1:] or [""]
    return "error", seconds, f"pytest exit {proc.returncode}: {tail[0]}"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _today() -> str:
    return time.strftime("%Y-%m-%d", time.gmtime())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", metavar="NAME", help="run only this mutant (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per mutant (default 600)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy (its path is printed)")
    parser.add_argument("--pytest-args", default="", help="extra pytest arguments, e.g. '-n 2'")
    parser.add_argument(
        "--baseline", action="store_true", help="first run each mutant's tests unmutated (they must pass)"
    )
    parser.add_argument(
        "--repo", type=Path, default=REPO, help="checkout to copy and mutate (default: this one)"
    )
    parser.add_argument(
        "--record",
        type=Path,
        metavar="JSON",
        help=f"merge each result into this record, rewritten after every mutant (e.g. {DEFAULT_RECORD})",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="with --record: skip mutants it records killed (as they are now)",
    )
    parser.add_argument(
        "--markdown",
        type=Path,
        metavar="PATH",
        help=f"write the page of the record (--record, default {DEFAULT_RECORD}) to PATH and exit; "
        "runs no tests",
    )
    args = parser.parse_args(argv)

    names = [m.name for m in MUTANTS]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        parser.error(f"duplicate mutant names in tests/mutant_list.py: {duplicates}")
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:<38} {m.file}\n{'':<38} {m.notice}\n{'':<38} tests: {' '.join(m.tests)}")
        return 0
    if args.markdown:
        source = args.record or REPO / DEFAULT_RECORD
        record = mutant_record.load(source)
        shown = source.resolve().relative_to(REPO) if source.resolve().is_relative_to(REPO) else source
        args.markdown.write_text(mutant_record.markdown(MUTANTS, record, str(shown)))
        print(f"wrote {args.markdown} from {source}")
        return 0
    if args.resume and not args.record:
        parser.error("--resume needs --record")
    selected = MUTANTS
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            parser.error(f"unknown mutant(s) {unknown}; see --list")
        selected = [m for m in MUTANTS if m.name in args.only]
    if args.resume:
        done = mutant_record.load(args.record)
        selected = [m for m in selected if not mutant_record.is_killed(done, m)]
    command = " ".join(["python tests/mutants.py", *(argv if argv is not None else sys.argv[1:])])

    # A terminated run still removes its copy (and subprocess.run kills the pytest it waits for).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = Path(tempfile.mkdtemp(prefix="ptpeft-mutants-"))
    copy = tmp / "repo"
    results = []
    try:
        copy_repo(args.repo.resolve(), copy)
        check_copy_is_imported(copy)
        print(f"{len(selected)} mutant(s), copy in {copy}\n")
        print(f"{'mutant':<38} {'result':<9} {'time s':>7}  detail")
        for m in selected:
            status, seconds, detail = run_mutant(
                m, copy, args.timeout, args.pytest_args.split(), args.baseline
            )
            results.append((m, status, seconds))
            print(f"{m.name:<38} {status:<9} {seconds:7.1f}  {detail}", flush=True)
            if args.record:
                result = {"status": status, "seconds": round(seconds, 1), "detail": detail}
                mutant_record.store(args.record, m, {**result, "date": _today(), "command": command})
    finally:
        if args.keep:
            print(f"\nkept {copy}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    counts = {s: sum(1 for _, st, _ in results if st == s) for s in ("killed", "survived", "error")}
    total = sum(sec for _, _, sec in results)
    killed, survived, errors = counts["killed"], counts["survived"], counts["error"]
    print(f"\n{killed} killed, {survived} survived, {errors} errors in {total:.0f} s")
    for m, status, _ in results:
        if status != "killed":
            print(f"  {status}: {m.name} ({m.file}): {m.notice}")
    return 0 if counts["killed"] == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())

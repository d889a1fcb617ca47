"""The mutation check's list stays applicable to the code, and its runner and page say what happened.

The mutants themselves run with ``python tests/mutants.py`` (minutes); this file only checks, in
about a second, that each mutation still finds its text exactly once and names tests that exist,
so a refactor that moves a mutated line is caught here, not at the next mutation run.
"""

import re
import subprocess
from pathlib import Path

import pytest

from tests import mutant_record, mutants
from tests.mutant_list import MUTANTS, Mutant

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("m", MUTANTS, ids=[m.name for m in MUTANTS])
def test_each_mutant_applies_once_and_names_existing_tests(m):
    text = (ROOT / m.file).read_text()
    assert text.count(m.find) == 1, f"{m.name}: its text occurs {text.count(m.find)} times in {m.file}"
    assert m.replace != m.find and m.notice.strip()
    for test in m.tests:
        path, _, node = test.partition("::")
        assert (ROOT / path).is_file(), f"{m.name}: no test file {path}"
        if node:
            name = node.split("[")[0]
            assert re.search(rf"^def {re.escape(name)}\(", (ROOT / path).read_text(), re.M), (
                f"{m.name}: {path} defines no {name}"
            )


def test_mutant_names_are_unique_kebab_case():
    names = [m.name for m in MUTANTS]
    assert len(names) == len(set(names))
    assert all(re.fullmatch(r"[a-z0-9]+(-[a-z0-9.]+)*", n) for n in names), names


@pytest.fixture
def toy_repo(tmp_path, monkeypatch):
    """A package of one function and a test of it: what run_mutant mutates (its pytest loads no
    plugins: seconds less per run on the loaded CI machine)."""
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    (tmp_path / "toy.py").write_text("def answer():\n    return 42\n")
    test = "from toy import answer\n\n\ndef test_answer():\n    assert answer() == 42\n"
    (tmp_path / "test_toy.py").write_text(test)
    return tmp_path


@pytest.mark.parametrize(
    "replace,status,detail",
    [
        ("return 41", "killed", "FAILED test_toy.py::test_answer"),
        ("return 6 * 7", "survived", "all named tests passed"),  # an equivalent mutant
        ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", "killed", "pytest died of SIGSEGV"),
    ],
    ids=["wrong-value", "equivalent", "crash"],
)
def test_run_mutant_classifies_failures_passes_and_crashes(toy_repo, replace, status, detail):
    m = Mutant("toy", "toy.py", "return 42", replace, ("test_toy.py::test_answer",), "a wrong answer")
    got_status, seconds, got_detail = mutants.run_mutant(m, toy_repo, 60.0, [])
    assert (got_status, got_detail) == (status, detail) and seconds > 0
    assert (toy_repo / "toy.py").read_text() == "def answer():\n    return 42\n"  # restored


@pytest.mark.parametrize(
    "output,status",
    [("FAILED test_toy.py::test_answer - assert 41 == 42\n", "killed"), ("1 passed\n", "error")],
    ids=["after-a-failure", "after-passing"],
)
def test_a_pytest_internal_error_counts_as_a_kill_only_after_a_failure(toy_repo, monkeypatch, output, status):
    """Exit 3 (INTERNALERROR): seen when a mutation left a DataLoader worker hung, whose unraisable
    exception broke pytest's exit after the test had failed."""
    done = subprocess.CompletedProcess([], 3, stdout=output + "INTERNALERROR> RuntimeError\n", stderr="")
    monkeypatch.setattr(mutants, "_pytest", lambda *args: done)
    m = Mutant("toy", "toy.py", "return 42", "return 41", ("test_toy.py::test_answer",), "a wrong answer")
    got, _, detail = mutants.run_mutant(m, toy_repo, 60.0, [])
    assert got == status and (detail == "FAILED test_toy.py::test_answer") == (status == "killed")


def test_a_text_that_is_not_there_once_is_an_error_not_a_kill(toy_repo):
    m = Mutant("toy", "toy.py", "return 7", "return 8", ("test_toy.py",), "n/a")
    assert mutants.run_mutant(m, toy_repo, 60.0, [])[0] == "error"


def test_the_record_merges_results_and_the_page_shows_each_mutant(tmp_path):
    path = tmp_path / "record.json"
    killed = Mutant("a-bug", "pkg/a.py", "x + 1", "x + 2", ("tests/t.py::test_a",), "off by one | wrong")
    lived = Mutant("b-bug", "pkg/b.py", "y", "z", ("tests/t.py",), "b is wrong")
    never = Mutant("c-bug", "pkg/c.py", "p", "q", ("tests/t.py",), "c is wrong")
    run = {"date": "2026-12-03", "command": "python tests/mutants.py --record r.json"}
    mutant_record.store(path, killed, dict(status="killed", seconds=2.5, detail="FAILED tests/t.py::test_a"))
    mutant_record.store(path, lived, dict(status="survived", seconds=4.0, detail="all named tests passed"))
    record = mutant_record.load(path)
    assert set(record) == {"a-bug", "b-bug"}  # the second store kept the first result
    record = {name: {**entry, **run} for name, entry in record.items()}
    changed = killed._replace(replace="x - 1")
    assert mutant_record.is_current(record, killed) and not mutant_record.is_current(record, changed)
    assert [mutant_record.is_killed(record, m) for m in (killed, changed, lived, never)] == [True] + [
        False
    ] * 3

    page = mutant_record.markdown([killed, lived, never], record, "r.json")
    rows = [line for line in page.splitlines() if line.startswith("| ") and "-bug" in line]
    assert rows == [
        r"| a-bug | `pkg/a.py` | off by one \| wrong | `tests/t.py::test_a` | 2.5 |",
        "| b-bug | `pkg/b.py` | b is wrong | **survived**: all named tests passed | 4.0 |",
        "| c-bug | `pkg/c.py` | c is wrong | not run |  |",
    ]
    assert "3 mutants: 1 killed, 1 survived, 1 not run. Sum of the mutants' test times: 6 s" in page
    assert "python tests/mutants.py --record r.json" in page and "run 2026-12-03." in page
    stale = mutant_record.markdown([changed], record, "r.json")
    assert "(stale: the mutant changed since)" in stale and "1 mutants: 1 stale" in stale

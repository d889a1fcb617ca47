"""Optional test dependencies: skipped with the package named only where the GPU suite asks, else an error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.optional import SKIP_MISSING, require

REPO = Path(__file__).resolve().parents[1]
MISSING = "ptpeft_no_such_test_dependency"


def test_a_missing_dependency_is_an_import_error_outside_the_gpu_suite(monkeypatch):
    monkeypatch.delenv(SKIP_MISSING, raising=False)
    with pytest.raises(ModuleNotFoundError, match=MISSING):
        require(MISSING, "these tests")
    monkeypatch.setenv(SKIP_MISSING, "0")
    with pytest.raises(ModuleNotFoundError, match=MISSING):
        require(MISSING, "these tests")


def test_a_missing_dependency_skips_naming_its_package_under_the_gpu_suite(monkeypatch):
    monkeypatch.setenv(SKIP_MISSING, "1")
    with pytest.raises(pytest.skip.Exception, match="the-pip-name is not installed: these tests need it"):
        require(MISSING, "these tests", package="the-pip-name")
    assert require("json", "these tests") is sys.modules["json"]  # a present one is imported as usual


def test_the_correctness_phase_collects_without_hypothesis(tmp_path):
    """The GPU image has no hypothesis: collecting the op tests must not stop at test_empty_dims.py."""
    (tmp_path / "hypothesis.py").write_text("raise ModuleNotFoundError('hidden for this test')\n")
    env = {**os.environ, SKIP_MISSING: "1", "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    # no:hypothesispytest: hypothesis' own pytest plugin (installed here) would import the hidden module
    argv = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-rs"]
    argv += ["-p", "no:cacheprovider", "-p", "no:hypothesispytest"]
    target = "tests/ops/test_empty_dims.py"
    done = subprocess.run([*argv, target], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert "SKIPPED [1] " in done.stdout, done.stdout + done.stderr
    assert "hypothesis is not installed: the empty-dimension property tests need it" in done.stdout
    assert "error" not in done.stdout.lower()

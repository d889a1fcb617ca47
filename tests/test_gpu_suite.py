"""benchmarks/gpu_suite.py on the CPU: failure codes, the shared budget, process groups, run ids,
optional tools, the summary's verdicts, and the whole suite at smoke shapes."""

import argparse
import csv
import os
import shutil
import time
from pathlib import Path

import pytest

from benchmarks import gpu_suite
from benchmarks.gpu_suite import PY, Phase, Step, Target

FIELDS = ["run_id", "device", "provider", "mode", "shape", "median_ms", "peak_mib"]

# A fake attention benchmark: appends this run's rows (run id from the suite) with our median argv[2].
WRITE_ROWS = """
import csv, os, sys
path, ours = sys.argv[1], sys.argv[2]
new = not os.path.exists(path)
with open(path, 'a', newline='') as f:
    w = csv.DictWriter(f, fieldnames=FIELDS)
    if new:
        w.writeheader()
    for provider, ms in (('ptpeft-triton', ours), ('peft-sdpa', '14.0'), ('sdpa-noprefix', '8.0')):
        w.writerow(dict(run_id=os.environ['PTPEFT_RUN_ID'], device='GPU X', provider=provider, mode='full',
                        shape='B8 H16 N2048 P32 D128 causal', median_ms=ms, peak_mib=1))
""".replace("FIELDS", repr(FIELDS))


def _target_rows(text: str) -> list[list[str]]:
    """The cells of the summary's target table (lines after its header)."""
    table = text.split("| target | measured | verdict |", 1)[1].split("\n\n", 1)[0]
    return [[c.strip() for c in line.split("|")[1:-1]] for line in table.splitlines()[2:]]


def _phase_status(text: str, name: str) -> str:
    row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
    return row.split("|")[2].strip()


def _dead(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # a zombie waits for its (re)parent to reap it: it runs nothing


SEGV = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"


def test_a_phase_killed_by_a_signal_fails_the_suite(tmp_path):
    phases = [
        Phase("fine", 0.5, "exits 0", lambda run: [Step([PY, "-c", "pass"])]),
        Phase("segv", 0.5, "dies of SIGSEGV", lambda run: [Step([PY, "-c", SEGV])]),
    ]
    code = gpu_suite.main(["--out", str(tmp_path), "--budget-s", "60"], phases=phases, targets=[])
    text = (tmp_path / "summary.md").read_text()
    assert code == 1  # max({fine: 0, segv: -11}) would have said 0
    assert _phase_status(text, "fine") == "ok"
    assert _phase_status(text, "segv").startswith("failed (killed by SIGSEGV after 0 s: -c 'import os")


def test_run_step_reports_the_negative_code_of_a_signal(tmp_path):
    code, _ = gpu_suite.run_step([PY, "-c", SEGV], tmp_path / "log", 30, dict(os.environ))
    assert code == -11


def test_two_runs_into_one_out_report_the_second_runs_figures(tmp_path):
    def phases(ours: str):
        step = Step([PY, "-c", WRITE_ROWS, str(tmp_path / "attn.csv"), ours])
        return [Phase("attn", 0.9, "fake attention benchmark", lambda run: [step])]

    targets = [t for t in gpu_suite.TARGETS if t.phase == "attn"]
    argv = ["--out", str(tmp_path), "--budget-s", "60"]
    assert gpu_suite.main(argv, phases=phases("10.0"), targets=targets) == 0
    first = (tmp_path / "summary.md").read_text()
    assert gpu_suite.main(argv, phases=phases("20.0"), targets=targets) == 0
    second = (tmp_path / "summary.md").read_text()
    rows = _target_rows(second)
    assert rows[0] == [
        "attn >= 1.3x faster than the PEFT path",
        "ptpeft-triton: 20.000 vs 14.000 ms = 1.429x (needs <= 0.769x)",
        "missed",
    ]
    assert rows[1][1].startswith("ptpeft-triton: 20.000 vs 8.000 ms = 2.500x")
    assert "10.000" not in second and "ptpeft-triton: 10.000 vs 14.000 ms = 0.714x" in first
    assert len(list(csv.DictReader((tmp_path / "attn.csv").open()))) == 6  # both runs' rows are kept
    assert len(list((tmp_path / "logs").iterdir())) == 2  # one log folder per run


SLOW_WITH_CHILD = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])
open(sys.argv[1], 'w').write(str(child.pid))
time.sleep(120)
"""


def test_the_budget_cuts_a_slow_phase_kills_its_group_and_the_next_phase_still_runs(tmp_path):
    pid_file = tmp_path / "child.pid"
    phases = [
        Phase(
            "slow",
            0.3,
            "sleeps past its share",
            lambda run: [Step([PY, "-c", SLOW_WITH_CHILD, str(pid_file)])],
        ),
        Phase("quick", 0.2, "exits 0", lambda run: [Step([PY, "-c", "pass"])]),
    ]
    targets = [Target("slow figure", "slow", lambda run: []), Target("quick figure", "quick", lambda run: [])]
    start = time.monotonic()
    code = gpu_suite.main(["--out", str(tmp_path), "--budget-s", "8"], phases=phases, targets=targets)
    took = time.monotonic() - start
    text = (tmp_path / "summary.md").read_text()
    assert code == 1 and took < 8
    assert _phase_status(text, "slow").startswith("cut (killed at its 2 s allowance: -c")  # 0.3 x 8 s
    assert _phase_status(text, "quick") == "ok"
    assert _target_rows(text)[0] == ["slow figure", "-", f"not reached (slow: {_phase_status(text, 'slow')})"]
    deadline = time.monotonic() + 5
    while not _dead(int(pid_file.read_text())) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _dead(int(pid_file.read_text())), "the phase's grandchild outlived the cut"


STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited by the child: only SIGKILL ends them
child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])
open(sys.argv[1], 'w').write(str(child.pid))
time.sleep(120)
"""


def test_a_group_that_ignores_sigterm_is_killed_after_the_grace(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_suite, "KILL_GRACE_S", 0.5)
    pid_file = tmp_path / "child.pid"
    code, seconds = gpu_suite.run_step(
        [PY, "-c", STUBBORN, str(pid_file)], tmp_path / "log", 1.5, dict(os.environ)
    )
    assert code is None and seconds < 4
    assert _dead(int(pid_file.read_text()))


def test_a_phase_the_budget_cannot_start_is_not_reached(tmp_path):
    phases = [Phase("late", 1.0, "never starts", lambda run: [Step([PY, "-c", "pass"])])]
    targets = [Target("late figure", "late", lambda run: [])]
    code = gpu_suite.main(["--out", str(tmp_path), "--budget-s", "2.5"], phases=phases, targets=targets)
    text = (tmp_path / "summary.md").read_text()
    assert code == 1
    assert _phase_status(text, "late") == "not reached (the budget was spent)"
    assert _target_rows(text) == [
        ["late figure", "-", "not reached (late: not reached (the budget was spent))"]
    ]


def test_missing_nvidia_smi_xdist_and_test_dependencies_are_skipped_and_said(tmp_path, monkeypatch):
    real_has = gpu_suite.Run.has
    monkeypatch.setattr(
        gpu_suite.Run,
        "has",
        lambda self, need: need not in ("exe:nvidia-smi", "xdist", "hypothesis") and real_has(self, need),
    )
    commands = []

    def tests_steps(run):
        commands.append(run.pytest("tests/x.py"))
        # what tests/optional.py reads to skip a test module whose dependency is missing
        check = "import os, sys; sys.exit(os.environ['PTPEFT_SKIP_MISSING_TEST_DEPS'] != '1')"
        return [Step([PY, "-c", check])]

    phases = [
        Phase(
            "env",
            0.3,
            "driver",
            lambda run: [Step(["nvidia-smi"], needs=("exe:nvidia-smi",)), Step([PY, "-c", "pass"])],
        ),
        Phase("tests", 0.3, "tests", tests_steps),
        Phase("only-smi", 0.3, "driver only", lambda run: [Step(["nvidia-smi"], needs=("exe:nvidia-smi",))]),
    ]
    code = gpu_suite.main(
        ["--out", str(tmp_path), "--budget-s", "60", "--workers", "4"], phases=phases, targets=[]
    )
    text = (tmp_path / "summary.md").read_text()
    assert code == 0
    assert "-n" not in commands[0] and commands[0][-1] == "tests/x.py"
    skipped = next(line for line in text.splitlines() if line.startswith("Skipped: "))
    assert "env: `nvidia-smi` skipped, nvidia-smi not found" in skipped
    assert "pytest-xdist is not installed: the tests ran in one process" in skipped
    assert "hypothesis is not installed: the tests that need it were skipped" in skipped
    assert _phase_status(text, "env") == "ok" and _phase_status(text, "only-smi") == "skipped"


def test_train_step_without_pillow_is_skipped_and_said_not_failed(tmp_path, monkeypatch):
    """The built-in model's batch is images: on a GPU image without pillow the phase skips, naming PIL."""
    real_has = gpu_suite.Run.has
    monkeypatch.setattr(gpu_suite.Run, "has", lambda self, need: need != "PIL" and real_has(self, need))
    code = gpu_suite.main(["--out", str(tmp_path), "--smoke", "--phases", "train_step", "--budget-s", "60"])
    text = (tmp_path / "summary.md").read_text()
    assert code == 0 and _phase_status(text, "train_step") == "skipped"
    skipped = next(line for line in text.splitlines() if line.startswith("Skipped: "))
    assert "train_step: `benchmarks/train_step.py --preset tiny" in skipped and "PIL not found" in skipped


def test_pytest_outcome_from_a_finished_and_from_a_cut_log(tmp_path):
    log = tmp_path / "tests.log"
    log.write_text("[gw0] [ 50%] PASSED tests/a.py::t1\n[gw1] [100%] FAILED tests/a.py::t2\n")
    assert gpu_suite.tests_outcome(log) == ("before the cut: 1 failed, 1 passed", 1)
    log.write_text(log.read_text() + "=========== 1 failed, 1 passed, 2 skipped in 3.21s ===========\n")
    assert gpu_suite.tests_outcome(log) == ("1 failed, 1 passed, 2 skipped", 1)


def _write(path, rows, run_id):
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for provider, mode, shape, median, peak in rows:
            writer.writerow(
                dict(zip(FIELDS, [run_id, "GPU X", provider, mode, shape, median, peak], strict=True))
            )


def test_summary_marks_each_target_met_missed_or_not_reached(tmp_path):
    args = argparse.Namespace(out=tmp_path, smoke=False, budget_s=360.0, autotune=False, workers=0, repeats=1)
    run = gpu_suite.Run(args)
    run.logs.mkdir(parents=True)
    shape = "B8 H16 N2048 P32 D128 causal"
    attn = [
        ("ptpeft-triton", "full", shape, 10.0, 1.0),
        ("ptpeft-triton", "forward", shape, 99.0, 1.0),  # other modes must not be read
        ("ptpeft-torch", "full", shape, 20.0, 1.0),
        ("peft-sdpa", "full", shape, 14.0, 1.0),
        ("sdpa-noprefix", "full", shape, 8.0, 1.0),
    ]
    _write(tmp_path / "attn.csv", attn, run.id)
    _write(
        tmp_path / "lora.csv",
        [("ptpeft-triton", "full", "x", 11.6, 1.0), ("base-linear", "full", "x", 10.0, 1.0)],
        run.id,
    )
    memory = [("ptpeft-triton", "full", f"B8 H16 N{n} P32 D128 causal", 1.0, n / 512) for n in (1024, 4096)]
    _write(tmp_path / "attn_memory.csv", memory, run.id)
    for name in ("attn", "lora", "memory"):
        run.results[name] = gpu_suite.PhaseResult("ok")
    run.results["adapter"] = gpu_suite.PhaseResult("cut", note="killed at its 21 s allowance: adapter.py")
    text = gpu_suite.write_summary(run, [], gpu_suite.TARGETS, 1)
    rows = {(r[0], r[1].split(":")[0]): r for r in _target_rows(text)}
    peft = "attn >= 1.3x faster than the PEFT path"
    assert rows[(peft, "ptpeft-triton")][1:] == [
        "ptpeft-triton: 10.000 vs 14.000 ms = 0.714x (needs <= 0.769x)",
        "met",
    ]
    assert rows[(peft, "ptpeft-torch")][1].startswith("ptpeft-torch: 20.000 vs 14.000 ms = 1.429x")
    assert rows[(peft, "ptpeft-torch")][2] == "missed"
    assert rows[("attn >= 0.9x of SDPA without prefix", "ptpeft-triton")][2] == "missed"  # 1.25x > 1.111x
    assert rows[("LoRA <= 1.15x the frozen base linear", "ptpeft-triton")][1].startswith(
        "ptpeft-triton: 11.600"
    )
    assert rows[("LoRA <= 1.15x the frozen base linear", "ptpeft-triton")][2] == "missed"
    adapter = rows[("adapter >= 1.5x faster than unfused", "-")]
    assert adapter[2] == "not reached (adapter: cut (killed at its 21 s allowance: adapter.py))"
    memory_row = rows[("attn fwd+bwd peak memory linear in N", "ptpeft-triton")]
    assert "N=1024: 2.0 MiB, N=4096: 8.0 MiB; x4.00 for x4 N" in memory_row[1] and memory_row[2] == "met"
    assert rows[("op / layer / backend / guard tests pass on the GPU", "-")][2].startswith("not reached")
    # A tests phase cut by the budget: what finished is reported; no failure seen is "not reached", not "met".
    (run.logs / "tests.log").write_text("[gw0] PASSED tests/a.py::t1\n[gw1] PASSED tests/a.py::t2\n")
    run.results["tests"] = gpu_suite.PhaseResult("cut", note="killed at its 151 s allowance: -m pytest")
    text = gpu_suite.write_summary(run, [], gpu_suite.TARGETS, 1)
    tests_row = next(r for r in _target_rows(text) if r[0].startswith("op / layer"))
    assert tests_row[1:] == ["before the cut: 2 passed", "not reached"]
    assert "GPU X" not in text.split("\n")[0]  # the device comes from this run's env log, absent here


CUDA_TARGET = "CUDA decode / LoRA targets (benchmarks/cuda_ops.py)"


def test_cuda_targets_are_read_from_this_runs_cuda_log(tmp_path):
    args = argparse.Namespace(out=tmp_path, smoke=False, budget_s=360.0, autotune=False, workers=0, repeats=1)
    run = gpu_suite.Run(args)
    run.logs.mkdir(parents=True)
    (run.logs / "cuda.log").write_text(
        "building...\nTARGET decode B=16 bandwidth share: 74.0 % of 4.1 TB/s -> met\n"
        "TARGET lora r=16 overhead: forward +14.2 % -> MISSED\nnot a TARGET line -> met\n"
    )
    run.results["cuda"] = gpu_suite.PhaseResult("ok")
    text = gpu_suite.write_summary(run, [], gpu_suite.TARGETS, 1)
    rows = [r for r in _target_rows(text) if r[0] == CUDA_TARGET]
    assert [r[1:] for r in rows] == [
        ["decode B=16 bandwidth share: 74.0 % of 4.1 TB/s", "met"],
        ["lora r=16 overhead: forward +14.2 %", "missed"],
    ]


def test_smoke_runs_the_whole_suite_on_the_cpu(tmp_path):
    """Every real phase at tiny shapes: env, tests, guard (the interpreter), each benchmark."""
    code = gpu_suite.main(["--out", str(tmp_path), "--smoke", "--repeats", "1", "--budget-s", "900"])
    text = (tmp_path / "summary.md").read_text()
    run_id = text.split("Run `", 1)[1].split("`", 1)[0]
    logs = "\n".join(p.read_text()[-2000:] for p in (tmp_path / "logs" / run_id).glob("*.log"))
    assert code == 0, text + logs
    for phase in gpu_suite.PHASES:
        assert _phase_status(text, phase.name) == "ok", phase.name
    for name in ("attn.csv", "lora.csv", "adapter.csv", "attn_memory.csv", "train_step.csv", "verify.csv"):
        rows = list(csv.DictReader((tmp_path / name).open()))
        assert rows and {r["run_id"] for r in rows} == {run_id}, name
        if name != "verify.csv":
            assert {r["dtype"] for r in rows} == {"bfloat16"}, name  # the train step too (it ran fp32)
    rows = _target_rows(text)
    # The CUDA extension cannot build against the CPU torch: its host-side tests ran, its targets cannot.
    assert [r[0] for r in rows if r[2].startswith("not reached")] == [CUDA_TARGET]
    assert "cuda: extension build, GPU tests and benchmarks need a GPU" in text
    assert {r[0] for r in rows} == {t.name for t in gpu_suite.TARGETS}
    measured = {r[0]: r[1] for r in rows}
    assert measured["op / layer / backend / guard tests pass on the GPU"] == "1 passed"
    assert measured["every kernel case agrees with float64 on this GPU (first-use guard)"].startswith(
        "2 of 2 cases agree"
    )
    assert measured["attn >= 1.3x faster than the PEFT path"].startswith(
        "ptpeft-torch: "
    )  # only torch on a CPU
    assert "# GPU suite on CPU (smoke run)" in text
    if shutil.which("nvidia-smi") is None:
        assert "env: `nvidia-smi` skipped, nvidia-smi not found" in text


@pytest.mark.parametrize("argv", [["--phases", "nope"]])
def test_unknown_phase_is_refused(tmp_path, argv, capsys):
    with pytest.raises(SystemExit):
        gpu_suite.main(["--out", str(tmp_path), *argv])
    assert "unknown phases ['nope']" in capsys.readouterr().err

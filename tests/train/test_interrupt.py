"""SIGINT / SIGTERM: the run finishes its step, writes a checkpoint, says how to resume and
exits 130 / 143; resumed, it ends as an uninterrupted run does. Real signals to a real
process (Ctrl-C reaches the terminal's whole process group, DataLoader workers included)."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from ptpeft_kernels.train.run import train

from .conftest import REPO, TINY

STEPS = 30
# Not --quiet: the progress output is checked too (stderr is a pipe here, as in a log file).
ARGS = [a for a in TINY if a != "--quiet"] + [
    "--method",
    "lora",
    "--steps",
    str(STEPS),
    "--save-every",
    "0",
    "--log-every",
    "1",
    "--rank-samples",
    "0",
    "--lora-dropout",
    "0.1",
]


def _train_losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["global_step"]: r["loss"] for r in rows if r["type"] == "train"}


def _interrupt(run_dir, signum):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "ptpeft_kernels.train", *ARGS, "--output-dir", str(run_dir)]
    # Bytes, not text=True: universal newlines would turn a bar's carriage returns into newlines.
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, **pipes)
    deadline = time.monotonic() + 180
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.is_file() and '"type": "train"' in metrics.read_text()):
        assert proc.poll() is None, proc.communicate()[1][-3000:].decode()
        assert time.monotonic() < deadline, "the run logged no training step in time"
        time.sleep(0.02)
    os.killpg(proc.pid, signum)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_assets):
    out = tmp_path_factory.mktemp("plain") / "run"
    train([*ARGS, "--quiet", "--output-dir", str(out)])
    return _train_losses(out)


# Both to the whole process group, as a terminal's Ctrl-C and a job scheduler's stop do: the
# DataLoader workers get the signal too.
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_checkpoints_the_finished_step_and_resumes(tmp_path, uninterrupted, signum):
    run = tmp_path / "run"
    rc, out, err = _interrupt(run, signum)
    assert rc == 128 + signum, err[-3000:]
    assert "Traceback" not in err and "\r" not in err, err[-3000:]
    name = signal.Signals(signum).name
    assert f"interrupted by {name}" in err and f"--resume {run}" in err, err[-3000:]
    # No finished step is lost: the checkpoint is the last logged step.
    logged = _train_losses(run)
    last = max(logged)
    assert last < STEPS and (run / "checkpoints" / "latest").read_text().strip() == f"step-{last:07d}"
    # One plain progress line per interval, not a redrawn bar.
    assert "evaluating: 1/1 (100%)" in err and f"lora: {last}/{STEPS}" in err, err[-3000:]
    if signum == signal.SIGTERM:
        return  # the resume after it is the same code path, checked once (test time)
    report = train(["--resume", str(run), "--quiet"])
    assert report["complete"] and report["global_steps"] == STEPS
    resumed = _train_losses(run)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step, loss in resumed.items():
        assert loss == pytest.approx(uninterrupted[step], rel=1e-5, abs=1e-6), f"step {step}"


def test_a_stop_between_training_and_evaluation_keeps_the_stage(tmp_path, tiny_assets, monkeypatch):
    """A signal after a stage's last step (here: while its outputs are saved, just before its
    evaluation): the checkpoint holds the finished stage; the resumed run only evaluates it and
    ends with the scores of an uninterrupted run."""
    from ptpeft_kernels.train import interrupt
    from ptpeft_kernels.train.loop import Trainer

    args = [*TINY, "--method", "pt-lora", "--steps", "2", "--rank-samples", "2", "--save-every", "0"]
    plain = train([*args, "--output-dir", str(tmp_path / "plain")])
    save_output = Trainer._save_stage_output

    def signal_arrives(self, stage):
        save_output(self, stage)
        if stage.name == "stage1-prefix":
            interrupt._requested = signal.SIGTERM

    monkeypatch.setattr(Trainer, "_save_stage_output", signal_arrives)
    run = tmp_path / "run"
    with pytest.raises(interrupt.Interrupted, match="stage stage1-prefix had finished training") as e:
        train([*args, "--output-dir", str(run)])
    assert e.value.exit_code == 143
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-0000001"
    monkeypatch.undo()
    report = train(["--resume", str(run), "--quiet"])
    assert report["complete"] and [s["steps"] for s in report["stages"]] == [1, 1]
    for got, want in zip(report["stages"], plain["stages"], strict=True):
        assert got["scores"] == pytest.approx(want["scores"], rel=1e-6)
        assert got["representation"]["cka"] == pytest.approx(want["representation"]["cka"], abs=1e-5)


class _SlowSecondItem(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        if i == 1:
            time.sleep(1.0)  # the main process waits for this item when the Ctrl-C arrives
        return os.getpid()


def test_a_worker_ignores_ctrl_c_and_ends_quietly_on_sigterm():
    """A Ctrl-C reaches the whole process group. A worker that died of it while the main process
    waited for its batch crashed the run ("DataLoader worker exited unexpectedly") instead of letting
    it checkpoint; the end-to-end test above only catches that when the signal lands in such a wait.
    SIGTERM must still end a worker, with status 0 (the loader's shutdown and the run's exit use it)."""
    from ptpeft_kernels.train import interrupt

    loader = torch.utils.data.DataLoader(
        _SlowSecondItem(), batch_size=None, num_workers=1, worker_init_fn=interrupt.init_worker
    )
    batches = iter(loader)
    worker_pid = int(next(batches))
    os.kill(worker_pid, signal.SIGINT)  # the worker is sleeping over item 1
    assert int(next(batches)) == worker_pid
    (worker,) = [p for p in multiprocessing.active_children() if p.pid == worker_pid]
    os.kill(worker_pid, signal.SIGTERM)
    worker.join(timeout=10)
    try:
        assert worker.exitcode == 0, f"the worker did not end quietly on SIGTERM (exit {worker.exitcode})"
    finally:
        if worker.is_alive():
            worker.kill()
        del batches

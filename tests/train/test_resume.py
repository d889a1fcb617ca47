"""A run killed with SIGKILL and resumed ends exactly like an uninterrupted run."""

import json
import signal

import pytest
import torch
from safetensors.torch import load_file

from ptpeft_kernels.train.run import train

from .conftest import TINY, run_cli

# LoRA dropout makes the result depend on the RNG state, which the checkpoint must restore.
COMMON = [
    *TINY,
    "--method",
    "pt-lora",
    "--steps",
    "10",
    "--save-every",
    "3",
    "--log-every",
    "1",
    "--lora-dropout",
    "0.1",
]


def _losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["global_step"], r["loss"]) for r in rows if r["type"] == "train"]


def _tensors(run_dir, stage):
    d = run_dir / stage
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items()})
    assert out, f"no tensors saved in {d}"
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_assets):
    out = tmp_path_factory.mktemp("plain") / "run"
    report = train([*COMMON, "--output-dir", str(out)])
    return out, report


# 10 steps: stage 1 is global steps 1-5, stage 2 steps 6-10; checkpoints after steps 3 (mid stage 1),
# 5 (stage 1 done) and 8 (mid stage 2). Killed after step 4, the resumed run restores optimizer,
# scheduler and RNG mid-stage; after step 7, it re-applies LoRA on the trained prefixes; after step 9,
# it restores the stage-2 optimizer over prefixes + LoRA.
EXPECTED_CHECKPOINT = {4: "step-0000003", 7: "step-0000005", 9: "step-0000008"}


@pytest.mark.parametrize("kill_at", sorted(EXPECTED_CHECKPOINT))
def test_sigkill_then_resume_matches_uninterrupted(tmp_path, uninterrupted, kill_at):
    ref_dir, ref = uninterrupted
    out = tmp_path / "run"
    proc = run_cli([*COMMON, "--output-dir", str(out), "--kill-at-step", str(kill_at)])
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert latest == EXPECTED_CHECKPOINT[kill_at]
    # The killed run logged steps past its checkpoint; the resumed one cuts them and redoes them.
    assert max(s for s, _ in _losses(out)) == kill_at

    report = train(["--resume", str(out), "--quiet"])
    assert report["complete"] and report["global_steps"] == 10
    got, want = _losses(out), _losses(ref_dir)
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, 11))
    for (s, a), (_, b) in zip(got, want, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6), f"loss at step {s}"
    for st_got, st_want in zip(report["stages"], ref["stages"], strict=True):
        assert st_got["scores"] == pytest.approx(st_want["scores"], rel=1e-6)
        assert st_got["representation"]["rank_ratio"] == pytest.approx(
            st_want["representation"]["rank_ratio"]
        )
        assert st_got["representation"]["cka"] == pytest.approx(st_want["representation"]["cka"], abs=1e-5)
    for stage in ("stage1-prefix", "stage2-lora"):
        a, b = _tensors(out, stage), _tensors(ref_dir, stage)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(
                a[k], b[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k, s=stage: f"{s} {k}: {m}"
            )


def test_resume_of_a_finished_run_changes_nothing(uninterrupted):
    ref_dir, ref = uninterrupted
    before = (ref_dir / "metrics.jsonl").read_text()
    report = train(["--resume", str(ref_dir), "--quiet"])
    assert [s["scores"] for s in report["stages"]] == [s["scores"] for s in ref["stages"]]
    assert (ref_dir / "metrics.jsonl").read_text() == before

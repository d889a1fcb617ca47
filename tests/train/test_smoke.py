"""A few steps of every method on both tasks, in-process, with the tiny built-in model."""

import json

import pytest

from ptpeft_kernels.train.config import METHODS
from ptpeft_kernels.train.run import train

from .conftest import TINY


@pytest.mark.parametrize("task", ["caption", "vqa"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_and_task_runs(tmp_path, tiny_assets, method, task):
    out = tmp_path / "run"
    report = train(
        [
            *TINY,
            "--method",
            method,
            "--task",
            task,
            "--steps",
            "2",
            "--output-dir",
            str(out),
            "--cache-dir",
            str(tiny_assets.root.parents[1]),
        ]
    )
    metric = "CIDEr" if task == "caption" else "VQA-acc"
    stages = report["stages"]
    assert len(stages) == (2 if method.startswith("pt-") else 1)
    assert sum(s["steps"] for s in stages) == 2
    for s in stages:
        assert metric in s["scores"] and s["representation"]["rank_ratio"] > 0
        assert 0 < s["trainable_params"] <= s["total_params"]
        if s["kind"] != "full":
            assert s["trainable_params"] < s["total_params"]
        assert (out / s["name"]).is_dir()
    if method.startswith("pt-"):
        # Stage 2 trains the stage-1 prefixes too.
        by_kind = stages[1]["trainable_by_kind"]
        assert by_kind["prefix"]["trainable"] > 0 and by_kind[method[3:]]["trainable"] > 0
    assert report["pretrained"]["representation"]["cka"] == pytest.approx(1.0)
    for name in ("config.json", "metrics.jsonl", "report.json", "loss_curve.png"):
        assert (out / name).is_file(), name
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in lines if r["type"] == "eval"] == ["pretrained"] + [s["name"] for s in stages]
    assert json.loads((out / "report.json").read_text())["complete"] is True


def test_gradient_checkpointing_gives_the_same_losses(tmp_path, tiny_assets):
    def losses(out):
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if r["type"] == "train"]

    args = [*TINY, "--method", "pt-lora", "--steps", "4", "--log-every", "1", "--rank-samples", "0"]
    train([*args, "--output-dir", str(tmp_path / "a")])
    train([*args, "--gradient-checkpointing", "--output-dir", str(tmp_path / "b")])
    assert losses(tmp_path / "b") == pytest.approx(losses(tmp_path / "a"), rel=1e-5, abs=1e-6)


def test_epochs_budget_converts_to_steps(tmp_path, tiny_assets):
    # 8 training examples at batch 4: 2 steps per epoch; pt-lora splits 1.5 epochs 50/50.
    report = train(
        [
            *TINY,
            "--epochs",
            "1.5",
            "--max-train-samples",
            "8",
            "--rank-samples",
            "0",
            "--output-dir",
            str(tmp_path / "r"),
        ]
    )
    assert [s["steps"] for s in report["stages"]] == [2, 2] and report["global_steps"] == 4

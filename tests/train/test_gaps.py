"""What a user of the driver would notice, pinned where the other driver tests left it open (issue 14).

Two short in-process runs of the tiny built-in model serve every test here: one on the built-in
task with a clipping threshold far below the gradient norm, one evaluating on a COCO-format
captions file with clipping off. A global optimizer pre-step hook records the gradient norm the
optimizer actually steps with.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ptpeft_kernels.train.run import train

from .conftest import TINY

MAX_NORM = 1e-3  # far below the tiny model's gradient norm (about 1 at the first steps): every step clips


def _run(out: Path, cache: Path, extra: list[str]) -> tuple[dict, list[float]]:
    norms: list[float] = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([g.double().norm() for g in grads])).item())

    handle = register_optimizer_step_pre_hook(record)
    try:
        report = train([*TINY, "--method", "lora", "--rank-samples", "0", "--output-dir", str(out),
                        "--cache-dir", str(cache), *extra])  # fmt: skip
    finally:
        handle.remove()
    return report, norms


@pytest.fixture(scope="module")
def builtin_run(tmp_path_factory, tiny_assets):
    out = tmp_path_factory.mktemp("gaps") / "builtin"
    extra = ["--steps", "2", "--max-grad-norm", str(MAX_NORM), "--max-eval-samples", "5"]
    report, norms = _run(out, tiny_assets.root.parents[1], extra)
    return out, report, norms, tiny_assets


# The built-in test split's images in a scrambled order; 40 gets no caption (so it is not an
# evaluation example at all), and the captions are listed in yet another order.
COCO_ORDER = [38, 33, 40, 35, 34, 39, 36, 37]


@pytest.fixture(scope="module")
def coco_run(tmp_path_factory, tiny_assets):
    tmp = tmp_path_factory.mktemp("gaps-coco")
    source = json.loads((tiny_assets.downstream_data.root / "captions_test2014.json").read_text())
    by_id = {im["id"]: im for im in source["images"]}
    captions = [a for a in source["annotations"] if a["image_id"] != 40]
    coco = {"images": [by_id[i] for i in COCO_ORDER], "annotations": sorted(captions, key=lambda a: -a["id"])}
    path = tmp / "captions_scrambled.json"
    path.write_text(json.dumps(coco))
    extra = ["--steps", "1", "--max-grad-norm", "0", "--val-captions", str(path), "--max-eval-samples", "4"]
    report, norms = _run(tmp / "run", tiny_assets.root.parents[1], extra)
    return tmp / "run", report, norms, coco


def _prediction_keys(run_dir: Path, stage: str) -> list[str]:
    return list(json.loads((run_dir / f"predictions-{stage}.json").read_text()))


def _sample_keys(run_dir: Path) -> dict[str, list[str]]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["stage"]: [s["key"] for s in r["samples"]] for r in rows if r["type"] == "eval"}


def test_gradient_clipping_bounds_the_norm_of_every_step(builtin_run, coco_run):
    """The optimizer steps with gradients of norm ``--max-grad-norm`` when they are larger.

    Mutation it guards against: clipping never applied (``if cfg.max_grad_norm > 0:`` ->
    ``if cfg.max_grad_norm < 0:`` in the training loop); all 92 driver tests passed on it.
    """
    _, _, norms, _ = builtin_run
    _, _, unclipped, _ = coco_run
    assert len(norms) == 2 and len(unclipped) == 1
    assert unclipped[0] > 100 * MAX_NORM  # without clipping the same first step is far above the bound
    for norm in norms:
        assert norm == pytest.approx(MAX_NORM, rel=1e-3)


def test_builtin_task_scores_the_first_test_images_in_file_order(builtin_run):
    """The built-in task evaluates the Karpathy file's ``test`` split in file order, and
    ``--max-eval-samples N`` keeps its first N images, before and after training alike.

    Mutations it guards against: a seeded shuffle of the evaluation examples, and
    ``--max-eval-samples`` keeping the last N (``evals[: cfg.max_eval_samples]`` ->
    ``evals[-cfg.max_eval_samples :]``).
    """
    out, report, _, assets = builtin_run
    karpathy = json.loads(assets.downstream_data.karpathy.read_text())
    test_ids = [str(im["cocoid"]) for im in karpathy["images"] if im["split"] == "test"]
    assert len(test_ids) > 5  # so that keeping 5 is a real choice
    assert report["eval_examples"] == 5
    for stage in ("pretrained", "lora"):
        assert _prediction_keys(out, stage) == test_ids[:5], stage
        assert _sample_keys(out)[stage] == test_ids[:3], stage


def test_coco_file_scores_its_captioned_images_in_file_order(coco_run):
    """A COCO ``captions_*.json`` evaluates its images in the file's order (not by id, not in the
    captions' order), only those with a caption, and ``--max-eval-samples`` keeps the first N.

    Mutation it guards against: the COCO loader's images reversed (``out.append(...)`` ->
    ``out.insert(0, ...)``), which also changes which N images are kept.
    """
    out, report, _, coco = coco_run
    captioned = {a["image_id"] for a in coco["annotations"]}
    want = [str(im["id"]) for im in coco["images"] if im["id"] in captioned][:4]
    assert want == ["38", "33", "35", "34"]  # the scrambled file order, image 40 skipped
    assert report["eval_examples"] == 4
    for stage in ("pretrained", "lora"):
        assert _prediction_keys(out, stage) == want, stage
        assert _sample_keys(out)[stage] == want[:3], stage

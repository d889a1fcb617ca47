"""``reproduce --model``: a user's saved checkpoint on a tiny COCO-format data set, end to end on the
CPU; the recipes it resolves and passes; the recipe file's validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from ptpeft_kernels.reproduce import load_recipes, main, reproduce
from tests.train.tiny_families import build_llava

WORDS = ["red", "blue", "green"]


def _coco(root: Path, name: str, first_id: int, count: int) -> Path:
    """A COCO captions_*.json with ``count`` 32 px JPEGs (one colour each, two captions per image)."""
    images, anns = [], []
    for k in range(count):
        image_id = first_id + k
        colour = WORDS[k % 3]
        fname = f"COCO_{name}_{image_id:012d}.jpg"
        Image.new("RGB", (32, 32), colour).save(root / fname)
        images.append({"id": image_id, "file_name": fname})
        anns += [
            {"id": 2 * image_id, "image_id": image_id, "caption": f"a {colour} square"},
            {"id": 2 * image_id + 1, "image_id": image_id, "caption": f"one {colour} shape"},
        ]
    path = root / f"captions_{name}.json"
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    return path


@pytest.fixture(scope="module")
def user_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    model = build_llava(root / "llava")
    data = root / "coco"
    data.mkdir()
    return model, _coco(data, "train2014", 1, 6), _coco(data, "val2014", 100, 4), data


def _argv(user_setup, out: Path) -> list[str]:
    model, train, val, images = user_setup
    return [
        "--model",
        str(model),
        "--captions",
        str(train),
        "--val-captions",
        str(val),
        "--image-dir",
        str(images),
        "--quick",
        "--steps",
        "2",
        "--methods",
        "lora",
        "--batch-size",
        "4",
        "--output-dir",
        str(out),
        "--quiet",
        "--",
        "--max-new-tokens",
        "3",
        "--rank-samples",
        "4",
        "--rank-bootstrap",
        "20",
        "--rank-length",
        "16",
        "--rank-pretrain-captions",
        str(train),
    ]


def test_reproduce_on_a_saved_checkpoint_and_coco_files(user_setup, tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        result = reproduce(_argv(user_setup, tmp_path / "r"))
    finally:
        torch.set_num_threads(threads)
    assert result["trained"] == 1 and (tmp_path / "r" / "reproduce.md").is_file()
    for method, lr in (("lora", {"lr": 2e-4}),):
        cfg = json.loads((tmp_path / "r" / "runs" / f"{method}-seed0" / "config.json").read_text())
        # Every data option reached the driver; the 'model' recipe set gave each method its rates.
        assert cfg["model"] == str(user_setup[0]) and cfg["val_captions"] == str(user_setup[2])
        assert cfg["batch_size"] == 4 and cfg["steps"] == 2 and cfg["rank_length"] == 16
        assert [s["lr"] for s in cfg["stages"]] == list(lr.values())
        report = json.loads((tmp_path / "r" / "runs" / f"{method}-seed0" / "report.json").read_text())
        assert report["eval_examples"] == 4 and report["train_examples"] == 12
        assert "pretrain_distribution" in report["stages"][-1]["representation"]
    md = (tmp_path / "r" / "reproduce.md").read_text()
    assert f"- model: {user_setup[0]}" in md and "'model' set" in md and "lora: lr 0.0002" in md
    out = capsys.readouterr().out
    assert "rank ratio over a spectrum of n = 16 singular values" in out


def test_print_config_shows_the_resolved_recipes_and_trains_nothing(user_setup, tmp_path, capsys):
    recipes = tmp_path / "mine.json"
    recipes.write_text(json.dumps({"model": {"methods": {"full": {"lr": 3e-6}}, "quick_steps": 7}}))
    argv = _argv(user_setup, tmp_path / "p")
    argv[argv.index("--steps") : argv.index("--steps") + 2] = []
    argv[argv.index("--methods") : argv.index("--methods") + 2] = [
        "--recipes",
        str(recipes),
        "--print-config",
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "recipe set: model" in text and "steps per run: 7" in text
    assert '  full: {"lr": 3e-06}' in text and '  lora: {"lr": 0.0002}' in text  # merged over the defaults
    assert "--method pt-adapter" in text and "--stage1-fraction 0.5" in text and "--val-captions" in text
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"model": {"methods": {"full": {"stage1_lr": 1e-3}}}}, "model.methods.full needs exactly ['lr']"),
        ({"builtin": {"methods": {"pt-lora": {"stage1_fraction": 1.0}}}}, "stage1_fraction must be a number"),
        ({"minilm": {"steps": 0}}, "minilm.steps must be an integer >= 1"),
        ({"builtin": {"options": ["--lr", "1"]}}, "set by reproduce itself"),
        ({"builtin": {"colour": 1}}, "unknown keys ['colour']"),
    ],
)
def test_bad_recipes_are_refused_naming_the_entry(tmp_path, patch, message):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(patch))
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_recipes(path)
    assert set(load_recipes()) == {"builtin", "minilm", "model"}

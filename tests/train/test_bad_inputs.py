"""Every bad input stops with a message that names the problem; nothing already written is lost."""

import json
import shutil

import pytest

from ptpeft_kernels.train.builtin_model import PRESETS, build_model
from ptpeft_kernels.train.loop import NonFiniteLossError
from ptpeft_kernels.train.run import train

from .conftest import TINY, run_cli


def _snapshot(d):
    return {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture()
def captions_copy(tmp_path, tiny_assets):
    """The tiny downstream captions (Karpathy file) and images, copied so a test may break them."""
    src = tiny_assets.downstream_data
    dst = tmp_path / "data"
    shutil.copytree(src.root, dst)
    return dst / "dataset_coco.json", dst / "images"


def test_missing_image_names_file_and_record(tmp_path, captions_copy):
    karpathy, images = captions_copy
    entry = json.loads(karpathy.read_text())["images"][2]
    (images / entry["filepath"] / entry["filename"]).unlink()
    args = [
        *TINY,
        "--captions",
        str(karpathy),
        "--image-dir",
        str(images),
        "--steps",
        "1",
        "--method",
        "lora",
    ]
    with pytest.raises(FileNotFoundError) as e:
        train([*args, "--output-dir", str(tmp_path / "a")])
    assert entry["filename"] in str(e.value) and f"cocoid {entry['cocoid']}" in str(e.value)
    assert not (tmp_path / "a").exists()
    report = train([*args, "--skip-missing", "--output-dir", str(tmp_path / "b")])
    assert (
        report["skipped_missing"]["train"] == 1
        and entry["filename"] in report["skipped_missing"]["records"][0]
    )


def test_malformed_json_names_file_and_key(tmp_path, captions_copy):
    karpathy, images = captions_copy
    data = json.loads(karpathy.read_text())
    del data["images"][0]["sentences"]
    karpathy.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"dataset_coco\.json: images\[0\] has no key 'sentences'"):
        train(
            [
                *TINY,
                "--captions",
                str(karpathy),
                "--image-dir",
                str(images),
                "--steps",
                "1",
                "--output-dir",
                str(tmp_path / "r"),
            ]
        )
    karpathy.write_text("{not json")
    proc = run_cli(
        [
            *TINY,
            "--captions",
            str(karpathy),
            "--image-dir",
            str(images),
            "--steps",
            "1",
            "--output-dir",
            str(tmp_path / "r"),
        ]
    )
    assert (
        proc.returncode == 2
        and "dataset_coco.json is not valid JSON" in proc.stderr
        and "--captions" in proc.stderr
    )


def test_unknown_method_task_and_model_family_list_the_valid_ones(tmp_path):
    proc = run_cli(["--method", "dora"])
    assert proc.returncode == 2 and "pt-lora" in proc.stderr and "adapter" in proc.stderr
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match=r"'bert'.*valid families: .*blip-2.*llava.*qwen2_vl"):
        train(
            [
                "--model",
                str(bert),
                "--steps",
                "1",
                "--captions",
                "x.json",
                "--image-dir",
                str(tmp_path),
                "--output-dir",
                str(tmp_path / "r"),
            ]
        )
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        train(
            [
                "--model",
                str(tmp_path),
                "--steps",
                "1",
                "--captions",
                "x.json",
                "--image-dir",
                str(tmp_path),
                "--output-dir",
                str(tmp_path / "r"),
            ]
        )


def test_checkpoint_of_another_base_model_is_refused(tmp_path, tiny_assets, captions_copy):
    karpathy, images = captions_copy
    model = tmp_path / "model"
    shutil.copytree(tiny_assets.model_dir, model)
    run = tmp_path / "run"
    train(
        [
            *TINY,
            "--model",
            str(model),
            "--captions",
            str(karpathy),
            "--image-dir",
            str(images),
            "--steps",
            "2",
            "--method",
            "pt-lora",
            "--output-dir",
            str(run),
        ]
    )
    before = _snapshot(run)
    other, _ = build_model(PRESETS["tiny"], seed=123)  # same architecture, other weights
    other.save_pretrained(model)
    with pytest.raises(ValueError, match=r"trained from another base model \(different weights"):
        train(["--resume", str(run), "--quiet"])
    assert _snapshot(run) == before


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, tiny_assets):
    run = tmp_path / "run"
    args = [
        *TINY,
        "--method",
        "lora",
        "--steps",
        "6",
        "--save-every",
        "2",
        "--fail-at-step",
        "3",
        "--output-dir",
        str(run),
    ]
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at global step 3 .*step-0000002") as e:
        train(args)
    assert e.value.step == 3
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-0000002"
    proc = run_cli([*args[:-1], str(tmp_path / "cli")])
    assert proc.returncode == 3 and "global step 3" in proc.stderr
    # The kept checkpoint resumes (the testing aid acts once) and finishes the run.
    report = train(["--resume", str(run), "--quiet"])
    assert report["complete"] and report["global_steps"] == 6


def test_existing_run_directory_is_not_overwritten(tmp_path, tiny_assets):
    run = tmp_path / "run"
    train([*TINY, "--method", "prefix", "--steps", "1", "--output-dir", str(run)])
    before = _snapshot(run)
    with pytest.raises(ValueError, match="already holds a run.*--resume"):
        train([*TINY, "--method", "prefix", "--steps", "1", "--output-dir", str(run)])
    assert _snapshot(run) == before


def test_resume_of_a_directory_that_is_no_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        train(["--resume", str(tmp_path)])

"""Driver hardening from new-user trials: evaluation splits, duplicate ids, unreadable images,
resume from elsewhere and with new options, bad run directories, fp16 on the CPU, Qwen2-VL's
torchvision need, and the pre-trained model's independence from the thread count."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ptpeft_kernels.train.builtin_model import BUILTIN_FAMILY, ensure_pretrained
from ptpeft_kernels.train.config import parse_args, resolve
from ptpeft_kernels.train.data import UnreadableImageError, load_image
from ptpeft_kernels.train.loop import NonFiniteLossError
from ptpeft_kernels.train.models import MissingDependencyError, load_processor
from ptpeft_kernels.train.run import main, train
from ptpeft_kernels.train.rundata import load_run_data

from .conftest import TINY


def _cfg(argv):
    return resolve(parse_args(argv))


def _data(argv):
    return load_run_data(_cfg(argv), BUILTIN_FAMILY, None)


@pytest.fixture()
def data_copy(tmp_path, tiny_assets):
    """The tiny downstream data (Karpathy file, COCO captions and VQAv2 files per split, images),
    copied so a test may break it."""
    dst = tmp_path / "data"
    shutil.copytree(tiny_assets.downstream_data.root, dst)
    return dst


def _images_of(examples):
    return {Path(e.image_path).name for e in examples}


# ----------------------------------------------------------------------------------- evaluation split


def test_a_file_without_split_needs_an_evaluation_file_or_a_holdout(data_copy):
    captions = [
        "--captions",
        str(data_copy / "captions_train2014.json"),
        "--image-dir",
        str(data_copy / "images"),
    ]
    with pytest.raises(ValueError, match=r"no split field.*--val-captions.*--holdout"):
        _data([*captions, "--steps", "1"])
    vqa = [
        "--task",
        "vqa",
        "--questions",
        str(data_copy / "v2_OpenEnded_mscoco_train2014_questions.json"),
        "--annotations",
        str(data_copy / "v2_mscoco_train2014_annotations.json"),
        "--image-dir",
        str(data_copy / "images"),
        "--steps",
        "1",
    ]
    with pytest.raises(ValueError, match=r"no split field.*--val-questions and --val-annotations.*--holdout"):
        _data(vqa)
    # --holdout: a quarter of the images (and every caption / question on them) leave training,
    # the same ones whatever the seed.
    d = _data([*captions, "--steps", "1", "--holdout", "0.25"])
    assert len(d.eval) == math.ceil(0.25 * 24) and not _images_of(d.eval) & _images_of(d.train)
    assert len(_images_of(d.train)) == 24 - len(d.eval) and "--holdout 0.25" in d.eval_source
    again = _data([*captions, "--steps", "1", "--holdout", "0.25", "--seed", "7"])
    assert [e.key for e in again.eval] == [e.key for e in d.eval]
    v = _data([*vqa, "--holdout", "0.25"])
    assert v.eval and not _images_of(v.eval) & _images_of(v.train)
    with pytest.raises(ValueError, match="--holdout and --val-captions"):
        _data([*captions, "--steps", "1", "--holdout", "0.2", "--val-captions", "x.json"])


def test_a_karpathy_file_keeps_its_own_splits(data_copy):
    karpathy = str(data_copy / "dataset_coco.json")
    test_ids = {
        img["cocoid"] for img in json.loads(Path(karpathy).read_text())["images"] if img["split"] == "test"
    }
    d = _data(["--captions", karpathy, "--image-dir", str(data_copy / "images"), "--steps", "1"])
    assert {e.key for e in d.eval} == test_ids and "split 'test'" in d.eval_source
    # The same file as --val-captions: its --eval-split, not every image in it (train ones included).
    d = _data(
        [
            "--captions",
            karpathy,
            "--val-captions",
            karpathy,
            "--image-dir",
            str(data_copy / "images"),
            "--steps",
            "1",
        ]
    )
    assert {e.key for e in d.eval} == test_ids
    with pytest.raises(ValueError, match="carries its own split"):
        _data(
            [
                "--captions",
                karpathy,
                "--image-dir",
                str(data_copy / "images"),
                "--steps",
                "1",
                "--holdout",
                "0.1",
            ]
        )


@pytest.mark.parametrize("task", ["caption", "vqa"])
def test_evaluating_on_training_examples_is_refused(tiny_assets, task):
    cfg = _cfg([*TINY, "--task", task, "--eval-split", "train", "--train-split", "train"])
    with pytest.raises(ValueError, match=r"are also training examples.*disjoint"):
        load_run_data(cfg, BUILTIN_FAMILY, tiny_assets.downstream_files())


def test_duplicate_evaluation_ids_are_refused(data_copy):
    val = data_copy / "captions_val2014.json"
    data = json.loads(val.read_text())
    data["images"].append(dict(data["images"][1]))
    val.write_text(json.dumps(data))
    args = [
        "--captions",
        str(data_copy / "captions_train2014.json"),
        "--image-dir",
        str(data_copy / "images"),
    ]
    dup_id = data["images"][1]["id"]
    with pytest.raises(ValueError, match=rf"image ids occur more than once: {dup_id} \(2 times\)"):
        _data([*args, "--val-captions", str(val), "--steps", "1"])
    q = data_copy / "v2_OpenEnded_mscoco_val2014_questions.json"
    a = data_copy / "v2_mscoco_val2014_annotations.json"
    qdata = json.loads(q.read_text())
    qdata["questions"].append(dict(qdata["questions"][0]))
    q.write_text(json.dumps(qdata))
    vqa = [
        "--task",
        "vqa",
        "--questions",
        str(data_copy / "v2_OpenEnded_mscoco_train2014_questions.json"),
        "--annotations",
        str(data_copy / "v2_mscoco_train2014_annotations.json"),
        "--val-questions",
        str(q),
        "--val-annotations",
        str(a),
        "--image-dir",
        str(data_copy / "images"),
        "--steps",
        "1",
    ]
    qid = qdata["questions"][0]["question_id"]
    with pytest.raises(ValueError, match=rf"question_ids occur more than once: {qid} \(2 times\)"):
        _data(vqa)
    # Two annotations of one question: the later would silently replace the earlier's answers.
    adata = json.loads(a.read_text())
    adata["annotations"].append(dict(adata["annotations"][0]))
    a.write_text(json.dumps(adata))
    with pytest.raises(
        ValueError, match=rf"question_id {adata['annotations'][0]['question_id']} is annotated twice"
    ):
        _data(vqa)


def test_report_records_the_scored_examples(tmp_path, data_copy):
    run = tmp_path / "run"
    report = train(
        [
            *TINY,
            "--captions",
            str(data_copy / "captions_train2014.json"),
            "--image-dir",
            str(data_copy / "images"),
            "--holdout",
            "0.25",
            "--method",
            "lora",
            "--steps",
            "1",
            "--rank-samples",
            "0",
            "--output-dir",
            str(run),
        ]
    )
    scored = json.loads((run / "predictions-lora.json").read_text())
    ev = report["evaluation_set"]
    assert report["eval_examples"] == ev["count"] == len(ev["ids"]) == len(scored) == 6
    assert sorted(str(i) for i in ev["ids"]) == sorted(scored) and "--holdout 0.25" in ev["source"]
    # What the figures depend on besides the code (item 12): versions, threads, the CPU's kernels.
    assert {"torch", "transformers", "tokenizers", "torch_threads", "cpu_capability"} <= report[
        "versions"
    ].keys()


# ----------------------------------------------------------------------------------- images


def _break_images(data_copy):
    """Truncate one training image; make one test image a text file. Returns their paths."""
    train_img = sorted((data_copy / "images" / "train2014").iterdir())[3]
    test_img = sorted((data_copy / "images" / "test2014").iterdir())[1]
    raw = train_img.read_bytes()
    train_img.write_bytes(raw[: len(raw) // 2])
    test_img.write_text("not an image")
    return train_img, test_img


def test_unreadable_images_stop_the_run_before_any_work_naming_every_file(tmp_path, data_copy):
    train_img, test_img = _break_images(data_copy)
    with pytest.raises(UnreadableImageError, match=str(train_img)):
        load_image(str(train_img))  # what a worker raises if a file breaks after the check
    args = [
        *TINY,
        "--captions",
        str(data_copy / "dataset_coco.json"),
        "--image-dir",
        str(data_copy / "images"),
    ]
    with pytest.raises(ValueError, match=r"2 image file\(s\) cannot be read") as e:
        train([*args, "--steps", "1", "--output-dir", str(tmp_path / "a")])
    assert (
        str(train_img) in str(e.value) and str(test_img) in str(e.value) and "--skip-missing" in str(e.value)
    )
    assert not (tmp_path / "a").exists()


def test_an_image_that_breaks_after_the_check_names_the_file(tmp_path, data_copy, monkeypatch):
    """The read fails in a DataLoader worker: the error names the file. The worker must still
    end when its loader (or the interpreter's exit) terminates it with SIGTERM: a worker that
    ignored SIGTERM hung the process at exit."""
    import multiprocessing

    from ptpeft_kernels.train import rundata

    _, test_img = _break_images(data_copy)
    monkeypatch.setattr(rundata, "check_images", lambda paths, show: {})  # as if it broke just after
    args = [
        *TINY,
        "--captions",
        str(data_copy / "dataset_coco.json"),
        "--image-dir",
        str(data_copy / "images"),
    ]
    with pytest.raises(UnreadableImageError, match=rf"cannot read image {test_img}"):
        train([*args, "--steps", "1", "--num-workers", "1", "--output-dir", str(tmp_path / "run")])
    left = multiprocessing.active_children()
    try:
        for worker in left:
            worker.terminate()
            worker.join(timeout=20)
        assert not [w for w in left if w.is_alive()], "a DataLoader worker survived SIGTERM"
    finally:
        for worker in left:
            if worker.is_alive():
                worker.kill()


def test_resume_from_elsewhere_after_an_image_broke(tmp_path, data_copy, monkeypatch):
    """Relative paths typed in one directory; resumed from another. An image that broke in
    between stops the resume before any training; --skip-missing gets past it; a budget change
    for the stage not started yet is applied and recorded."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    args = [
        *TINY,
        "--captions",
        "../data/dataset_coco.json",
        "--image-dir",
        "../data/images",
        "--method",
        "pt-lora",
        "--steps",
        "4",
        "--save-every",
        "1",
        "--rank-samples",
        "0",
        "--output-dir",
        "run",
    ]
    with pytest.raises(NonFiniteLossError):
        train([*args, "--fail-at-step", "2"])
    run = work / "run"
    saved = json.loads((run / "config.json").read_text())
    assert saved["captions"] == str(data_copy / "dataset_coco.json") and saved["output_dir"] == str(run)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    train_img, _ = _break_images(data_copy)
    metrics = (run / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match=str(train_img)):
        train(["--resume", str(run), "--quiet"])
    assert (run / "metrics.jsonl").read_text() == metrics
    assert (run / "checkpoints" / "latest").read_text() == "step-0000001\n"
    report = train(["--resume", str(run), "--quiet", "--skip-missing", "--stage2-steps", "3"])
    assert report["complete"] and [s["steps"] for s in report["stages"]] == [2, 3]
    assert report["skipped_unreadable"]["train"] == 5 and report["skipped_unreadable"]["eval"] == 1
    changes = report["resume_changes"][0]
    assert changes["global_step"] == 1 and any("stage2-lora: steps 2 -> 3" in c for c in changes["changes"])
    assert json.loads((run / "config.json").read_text())["stages"][1]["steps"] == 3


# ----------------------------------------------------------------------------------- resume options


def _state(stage_index, stage_step, done):
    return {"stage_index": stage_index, "stage_step": stage_step, "stage_done": done, "global_step": 9}


def test_resume_options_apply_or_are_refused():
    from ptpeft_kernels.train.resume import apply_resume_options, explicit_options

    assert explicit_options(["--resume", "r", "--steps", "5"]) == {"resume": "r", "steps": 5}
    base = [*TINY, "--method", "pt-lora", "--steps", "10", "--output-dir", "/tmp/x"]
    # Stage 1 in progress: stage 2's budget may change, stage 1's may not.
    cfg = _cfg(base)
    notes = apply_resume_options(cfg, {"stage2_steps": 8, "num_workers": 0}, _state(0, 3, False))
    assert [s.steps for s in cfg.stages] == [5, 8] and cfg.num_workers == 0
    assert any("stage2-lora: steps 5 -> 8" in n for n in notes) and any("--num-workers 0" in n for n in notes)
    # --steps resizes what is left: stage 1 keeps its 5 steps.
    cfg = _cfg(base)
    apply_resume_options(cfg, {"steps": 20}, _state(0, 3, False))
    assert [s.steps for s in cfg.stages] == [5, 15]
    in_progress = r"--stage1-steps 8 would change stage stage1-prefix, which is in progress \(step 3\)"
    with pytest.raises(ValueError, match=in_progress):
        apply_resume_options(_cfg(base), {"stage1_steps": 8}, _state(0, 3, False))
    # A single-stage method's one stage is in progress from its first step.
    lora = _cfg([*TINY, "--method", "lora", "--steps", "10", "--output-dir", "/tmp/x"])
    with pytest.raises(ValueError, match=r"--steps 20 would change stage lora, which is in progress"):
        apply_resume_options(lora, {"steps": 20}, _state(0, 3, False))
    # Before any training step every stage may change; a finished stage never.
    cfg = _cfg(base)
    apply_resume_options(cfg, {"steps": 20}, _state(0, 0, False))
    assert [s.steps for s in cfg.stages] == [10, 10]
    with pytest.raises(ValueError, match="which is complete"):
        apply_resume_options(_cfg(base), {"stage1_lr": 0.5}, _state(0, 5, True))
    # Anything else that differs is named with the run's value; equal values and paths are fine.
    cfg = _cfg(base)
    with pytest.raises(ValueError, match=r"--batch-size 8 \(the run has 4\).*--seed 3 \(the run has 0\)"):
        apply_resume_options(cfg, {"batch_size": 8, "seed": 3}, _state(0, 3, False))
    assert (
        apply_resume_options(cfg, {"batch_size": 4, "output_dir": "/tmp/../tmp/x"}, _state(0, 3, False)) == []
    )


# ----------------------------------------------------------------------------------- before any work


def test_bad_output_dir_and_fp16_on_the_cpu_stop_before_any_work(tmp_path, tiny_assets):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match=r"--output-dir .*file/run: .*file is not a directory"):
        train([*TINY, "--output-dir", str(a_file / "run")])
    with pytest.raises(ValueError, match=r"--output-dir /proc/ptpeft/run: cannot create files under /proc"):
        train([*TINY, "--output-dir", "/proc/ptpeft/run"])
    with pytest.raises(ValueError, match="float16 is not supported on the CPU"):
        train([*TINY, "--dtype", "float16", "--device", "cpu", "--output-dir", str(tmp_path / "fp16")])
    assert not (tmp_path / "fp16").exists()


def test_qwen2_vl_processor_without_torchvision_says_what_to_install(tmp_path, capsys):
    import importlib.util

    from .tiny_families import build_qwen2_vl

    path = build_qwen2_vl(tmp_path / "qwen")
    # What a real Qwen2-VL checkpoint carries: the full processor class and a video processor config.
    meta = json.loads((path / "processor_config.json").read_text())
    meta["processor_class"] = "Qwen2VLProcessor"
    (path / "processor_config.json").write_text(json.dumps(meta))
    video = {"video_processor_type": "Qwen2VLVideoProcessor", "patch_size": 8, "merge_size": 2}
    (path / "video_preprocessor_config.json").write_text(json.dumps(video))
    if importlib.util.find_spec("torchvision") is not None:
        assert load_processor(path).image_processor is not None
        return
    with pytest.raises(MissingDependencyError, match=r"needs torchvision.*pip install torchvision"):
        load_processor(path)
    # The command line: exit status 2 and the message, no traceback.
    argv = ["--model", str(path), "--steps", "1", "--captions", "c.json", "--image-dir", str(tmp_path)]
    assert main([*argv, "--output-dir", str(tmp_path / "run")]) == 2
    assert "needs torchvision" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- built-in model


def test_pretraining_does_not_depend_on_the_thread_count(tmp_path, tiny_assets):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        other = ensure_pretrained("tiny", tmp_path / "cache", quiet=True)
    finally:
        torch.set_num_threads(before)
    assert torch.get_num_threads() == before
    a = load_file(str(tiny_assets.model_dir / "model.safetensors"))
    b = load_file(str(other.model_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_cache_key_covers_what_decides_the_weights(monkeypatch):
    from ptpeft_kernels.train import builtin_model

    spec = builtin_model.PRESETS["tiny"]
    env = builtin_model.build_environment()
    assert {"torch", "transformers", "tokenizers", "pillow", "numpy", "cpu_capability"} <= env.keys()
    key = spec.key()
    for name, other in (
        ("cpu_capability", "AVX2" if env["cpu_capability"] != "AVX2" else "AVX512"),
        ("torch", "0.0"),
    ):
        monkeypatch.setattr(builtin_model, "build_environment", lambda n=name, o=other: {**env, n: o})
        assert spec.key() != key, name

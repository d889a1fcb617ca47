"""The driver on other families than the built-in model: tiny random LLaVA, LLaVA-NeXT, BLIP-2,
InstructBLIP and Qwen2-VL checkpoints (Qwen2-VL's processor loaded without its video half, whose
class needs torchvision: see tiny_families)."""

import json

import pytest

from ptpeft_kernels.train import run
from ptpeft_kernels.train.data import IGNORE_INDEX, Collator, load_vqa
from ptpeft_kernels.train.models import end_text, family_for, load_processor
from ptpeft_kernels.train.run import train

from .conftest import TINY
from .tiny_families import (
    build_blip2,
    build_instructblip,
    build_llava,
    build_llava_next,
    build_qwen2_vl,
    load_qwen2_vl_processor,
)

BUILDERS = {
    "llava": build_llava,
    "llava_next": build_llava_next,
    "blip-2": build_blip2,
    "instructblip": build_instructblip,
    "qwen2_vl": build_qwen2_vl,
}
PROCESSOR_LOADERS = {"qwen2_vl": load_qwen2_vl_processor}  # the others: AutoProcessor, as the driver does


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def checkpoint(request, tmp_path_factory):
    return request.param, BUILDERS[request.param](tmp_path_factory.mktemp(request.param) / "ckpt")


def test_family_template_and_labels(checkpoint, tiny_assets):
    name, path = checkpoint
    model_type, family = family_for(path)
    assert model_type == name
    processor = PROCESSOR_LOADERS.get(name, load_processor)(path)
    split = tiny_assets.downstream_data.splits["train"]
    examples, _ = load_vqa(
        split.questions, split.annotations, tiny_assets.downstream_data.image_dir, prompt=family.vqa_prompt
    )
    end = end_text(family, processor)
    assert end == ("<|im_end|>" if name == "qwen2_vl" else "</s>")
    batch = Collator(processor, family.template, end, "train")(examples[:3])
    tok = processor.tokenizer
    for i, e in enumerate(examples[:3]):
        labels = batch["labels"][i]
        assert tok.decode(labels[labels != IGNORE_INDEX]) == f"{e.target} {end}"


@pytest.mark.parametrize("task", ["caption", "vqa"])
def test_family_trains_and_evaluates(checkpoint, tiny_assets, tmp_path, task, monkeypatch):
    name, path = checkpoint
    if name in PROCESSOR_LOADERS:
        monkeypatch.setattr(run, "load_processor", PROCESSOR_LOADERS[name])
    d = tiny_assets.downstream_data
    data = (
        ["--captions", str(d.karpathy)]
        if task == "caption"
        else [
            "--questions",
            str(d.splits["train"].questions),
            "--annotations",
            str(d.splits["train"].annotations),
            "--val-questions",
            str(d.splits["val"].questions),
            "--val-annotations",
            str(d.splits["val"].annotations),
        ]
    )
    out = tmp_path / "run"
    report = train(
        [
            *TINY,
            "--model",
            str(path),
            "--task",
            task,
            *data,
            "--image-dir",
            str(d.image_dir),
            "--steps",
            "2",
            "--output-dir",
            str(out),
        ]
    )
    assert report["complete"] and [s["name"] for s in report["stages"]] == ["stage1-prefix", "stage2-lora"]
    assert json.loads((out / "config.json").read_text())["model"] == str(path)
    assert (out / "stage2-lora" / "peft_lora" / "adapter_config.json").is_file()

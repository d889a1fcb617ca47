"""TRL's ``SFTTrainer`` with PT-PEFT on a tiny saved LLaVA with a real processor: TRL's own vision-language
collator (prompt-completion captions), adapter checkpoints, bit-exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import ptpeft_kernels as pk
from tests.file_tree import file_tree
from tests.optional import require

from ..train.tiny_families import build_llava

require("trl", "the SFTTrainer tests")
require("datasets", "the SFTTrainer tests (TRL's datasets)")

WORDS = ["a", "red", "blue", "green", "circle", "square", "triangle", "on", "the", "left", "right", "top"]


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    from transformers import AutoProcessor

    path = build_llava(tmp_path_factory.mktemp("sft") / "llava")
    return path, AutoProcessor.from_pretrained(path)


def captions(n: int = 8):
    """A vision prompt-completion dataset: TRL's collator runs the processor on the images and texts."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = [
        {
            "images": [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))],
            "prompt": "<image> describe the image :",
            "completion": " ".join(rng.choice(WORDS, 5)) + " </s>",
        }
        for _ in range(n)
    ]
    return datasets.Dataset.from_list(rows)


def sft_run(path, processor, output_dir, resume=None):
    from transformers import LlavaForConditionalGeneration
    from trl import SFTConfig, SFTTrainer

    class PTPEFTSFTTrainer(pk.PTPEFTTrainerMixin, SFTTrainer):
        pass

    model = LlavaForConditionalGeneration.from_pretrained(path)
    pk.apply_prefix(model, num_prefix=4, reparam_hidden=16)
    pk.apply_lora(model, r=4, alpha=8)
    config = SFTConfig(
        output_dir=str(output_dir),
        max_steps=4,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        save_steps=2,
        logging_steps=1,
        max_length=None,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    trainer = PTPEFTSFTTrainer(model=model, args=config, train_dataset=captions(), processing_class=processor)
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


def test_sft_trainer_trains_checkpoints_and_resumes_exactly(llava, tmp_path):
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    path, processor = llava
    model, trainer = sft_run(path, processor, tmp_path / "a")
    assert isinstance(trainer.data_collator, DataCollatorForVisionLanguageModeling)
    checkpoint = tmp_path / "a" / "checkpoint-2"
    names = file_tree(checkpoint)
    assert {"ptpeft_config.json", "prefix_model.safetensors", "peft_lora/adapter_model.safetensors"} <= names
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= names
    assert "model.safetensors" not in names
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(np.isfinite(losses))

    resumed_model, resumed = sft_run(path, processor, tmp_path / "b", resume=str(checkpoint))
    assert [h["loss"] for h in resumed.state.log_history if "loss" in h] == losses
    a, b = model.state_dict(), resumed_model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Steps 3-4 moved the prefixes: the equality is not that of two untrained models.
    at_step_2 = load_file(str(checkpoint / "prefix_model.safetensors"))
    final = model.ptpeft_prefix.encoders.state_dict()
    assert all(not torch.equal(at_step_2[k], final[k]) for k in at_step_2)

"""PT-PEFT inside a Hugging Face ``Trainer`` script: two stages, adapter checkpoints, exact resume.

Stage 1 trains prefixes only at a high learning rate; stage 2 adds LoRA and trains it together
with the prefixes at a lower one. Each stage is one ``Trainer.train()`` call of its own
``PTPEFTTrainer`` (a ``transformers.Trainer`` whose resume loads the PT-PEFT files), so the
stage-2 optimizer and scheduler are built afresh over every trainable parameter: LoRA and the
prefixes. Every ``checkpoint-N/`` holds the adapters (``pk.save_adapters`` layout) plus the
Trainer's optimizer / scheduler / RNG state, not a copy of the base model; ``--resume`` continues
each stage from its last checkpoint, bit-exact on the CPU.

The model is a randomly initialised tiny LLaVA and the data random tokens (nothing is downloaded):
with a real checkpoint, replace ``tiny_model("llava")`` by ``LlavaForConditionalGeneration.
from_pretrained(path)`` and the dataset by processor outputs (or use TRL's ``SFTTrainer`` with
``class PTPEFTSFTTrainer(pk.PTPEFTTrainerMixin, SFTTrainer)``, see the README).

    python python/trainer_ptpeft.py --output-dir run
    python python/trainer_ptpeft.py --output-dir run --resume        # continue after an interruption
    accelerate launch --cpu --num_processes 2 python/trainer_ptpeft.py --output-dir run-ddp --batch-size 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import ptpeft_kernels as pk
from ptpeft_kernels.integrations.hf_trainer import checkpointing_argument
from ptpeft_kernels.integrations.tiny import IMAGE_TOKEN, tiny_inputs, tiny_model


class TinyCaptions(torch.utils.data.Dataset):
    """``n`` LLaVA examples: image, placeholder tokens and text; next-token loss on the text only."""

    def __init__(self, n: int = 16, seed: int = 1) -> None:
        batch = tiny_inputs("llava", batch=n, text_len=8, seed=seed)
        labels = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE_TOKEN, -100)
        batch["labels"] = labels.masked_fill(batch["attention_mask"] == 0, -100)
        self.rows = [{k: v[i] for k, v in batch.items()} for i in range(n)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


def stage_args(output_dir: Path, lr: float, steps: int, a: argparse.Namespace):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir),
        learning_rate=lr,
        max_steps=steps,
        per_device_train_batch_size=a.batch_size,
        save_steps=a.save_steps,
        logging_steps=1,
        **checkpointing_argument(a.gradient_checkpointing),  # the field's name depends on the release
        report_to="none",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        seed=0,
    )


def last_checkpoint(output_dir: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", type=Path, default=Path("run"))
    p.add_argument("--stage1-steps", type=int, default=4)
    p.add_argument("--stage2-steps", type=int, default=4)
    p.add_argument("--stage1-lr", type=float, default=1e-2)
    p.add_argument("--stage2-lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=4, help="per device (process)")
    p.add_argument("--save-steps", type=int, default=2)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--resume", action="store_true", help="continue each stage from its last checkpoint")
    a = p.parse_args(argv)

    model = tiny_model("llava")  # or LlavaForConditionalGeneration.from_pretrained(...)
    data = TinyCaptions()
    stages = {}

    # Stage 1: prefixes only (the model is frozen), high learning rate.
    pk.apply_prefix(model, num_prefix=8, reparam_hidden=64)
    out1 = a.output_dir / "stage1"
    args1 = stage_args(out1, a.stage1_lr, a.stage1_steps, a)
    trainer = pk.PTPEFTTrainer(model=model, args=args1, train_dataset=data)
    stages["stage1"] = trainer.train(resume_from_checkpoint=last_checkpoint(out1) if a.resume else None)

    # Stage 2: LoRA added; the prefixes stay trainable. A new Trainer builds a new optimizer and
    # scheduler over both (trainer.next_stage(output_dir=..., learning_rate=...) does the same on the
    # stage-1 Trainer).
    pk.apply_lora(model, r=8, alpha=16)
    out2 = a.output_dir / "stage2"
    args2 = stage_args(out2, a.stage2_lr, a.stage2_steps, a)
    trainer = pk.PTPEFTTrainer(model=model, args=args2, train_dataset=data)
    stages["stage2"] = trainer.train(resume_from_checkpoint=last_checkpoint(out2) if a.resume else None)

    # The trained adapters alone (save_model -> model.save_pretrained -> the pk.save_adapters layout);
    # reload with pk.load_adapters(LlavaForConditionalGeneration.from_pretrained(base), path).
    final = a.output_dir / "adapters"
    trainer.save_model(str(final))
    world = trainer.args.world_size
    backend = torch.distributed.get_backend() if world > 1 else None
    if trainer.is_world_process_zero():
        print(f"world size {world}" + (f" (DDP, {backend})" if backend else ""))
        print(pk.trainable_summary(model))
        losses = ", ".join(f"{k} loss {v.training_loss:.4f}" for k, v in stages.items())
        print(losses)
        print(f"adapters in {final}: {sorted(x.name for x in final.iterdir())}")
    return {"model": model, "trainer": trainer, "stages": stages, "adapters": final, "world_size": world}


if __name__ == "__main__":
    main()

"""PT-PEFT inside transformers' Trainer: adapter checkpoints, bit-exact resume, best model, two stages.

Tiny LLaVA and BLIP-2 (random weights, ``tiny.py``) on 16 fixed examples; every run is a few
optimizer steps. "Bit-exact" means ``torch.equal`` on every parameter of the model.
"""

from __future__ import annotations

import shutil

import pytest
import torch

import ptpeft_kernels as pk
from ptpeft_kernels.integrations.hf_trainer import checkpointing_argument
from ptpeft_kernels.integrations.tiny import IMAGE_TOKEN, tiny_inputs, tiny_model
from tests.file_tree import file_tree

FAMILIES = ["llava", "blip2"]
CHECKPOINT_FILES = {
    "ptpeft_config.json",
    "prefix_model.safetensors",
    "peft_lora/adapter_config.json",
    "peft_lora/adapter_model.safetensors",
    "optimizer.pt",
    "scheduler.pt",
    "rng_state.pth",
    "trainer_state.json",
    "training_args.bin",
}


class Examples(torch.utils.data.Dataset):
    """``n`` examples of ``family``: image, placeholder tokens, text; loss on the text tokens only."""

    def __init__(self, family: str, n: int = 16) -> None:
        batch = tiny_inputs(family, batch=n, text_len=6, seed=1)
        batch["labels"] = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE_TOKEN, -100)
        self.rows = [{k: v[i] for k, v in batch.items()} for i in range(n)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def adapted(family: str) -> torch.nn.Module:
    model = tiny_model(family)
    pk.apply_prefix(model, num_prefix=4, reparam_hidden=16)
    pk.apply_lora(model, r=4, alpha=8)
    return model


def arguments(output_dir, steps: int = 6, gc: bool = False, save_steps: int = 3, **extra):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_steps=save_steps,
        logging_steps=1,
        **checkpointing_argument(gc),
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        **extra,
    )


def assert_same_parameters(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    differ = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def train_losses(trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def step_counter():
    """A callback recording the global step after each optimizer step this process ran."""
    from transformers import TrainerCallback

    class Steps(TrainerCallback):
        seen: list[int] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.seen.append(state.global_step)

    return Steps()


@pytest.fixture(scope="module", params=[(f, gc) for f in FAMILIES for gc in (False, True)], ids=str)
def uninterrupted(request, tmp_path_factory):
    """A 6-step run of ``family`` (gradient checkpointing on / off), checkpoints at steps 3 and 6."""
    family, gc = request.param
    out = tmp_path_factory.mktemp(f"{family}-gc{gc}")
    model = adapted(family)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    args = arguments(out / "run", gc=gc)
    trainer = pk.PTPEFTTrainer(model=model, args=args, train_dataset=Examples(family))
    # The tests' thread count (conftest's _one_thread runs after module fixtures): a CPU run is bit-exact
    # only against one with the same number of threads (they split the reductions differently).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer.train()
    finally:
        torch.set_num_threads(threads)
    return family, gc, out, model, trainer, init


def test_checkpoints_hold_the_adapters_and_trainer_state_not_the_base(uninterrupted):
    family, gc, out, model, trainer, init = uninterrupted
    # is_activation_checkpointing (5.23+) / is_gradient_checkpointing (deprecated there) read this flag
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) == gc
    for step in (3, 6):
        assert file_tree(out / "run" / f"checkpoint-{step}") == CHECKPOINT_FILES
    # The last checkpoint holds exactly the trained adapters: loaded into a fresh base, it is the model.
    assert_same_parameters(pk.load_adapters(tiny_model(family), out / "run" / "checkpoint-6"), model)
    # Training moved the prefixes and LoRA (prefix gradients flow through checkpointed layers), not the base.
    kinds = pk.integrations.stages.parameter_kinds(model)
    state = model.state_dict()
    moved = {k for k in init if k in kinds and not torch.equal(init[k], state[k])}
    assert {kinds[k] for k in moved} == {"prefix", "lora"}
    assert all(kinds[k] != "base" for k in moved)


def test_resume_ends_bit_exact_with_the_uninterrupted_run(uninterrupted, tmp_path):
    family, gc, out, model, trainer, _ = uninterrupted
    # Each way of resuming runs with checkpointing on and off, one family each (one resumed run per fixture).
    by_path = gc == (family == "blip2")
    run = tmp_path / "resumed"
    if by_path:
        resume = str(out / "run" / "checkpoint-3")
    else:  # the last checkpoint of output_dir, as after a crash at step 4 or 5
        shutil.copytree(out / "run" / "checkpoint-3", run / "checkpoint-3")
        resume = True
    fresh = adapted(family)  # other random prefixes / LoRA: everything trained must come from the checkpoint
    steps = step_counter()
    resumed = pk.PTPEFTTrainer(
        model=fresh, args=arguments(run, gc=gc), train_dataset=Examples(family), callbacks=[steps]
    )
    resumed.train(resume_from_checkpoint=resume)
    assert steps.seen == [4, 5, 6]
    assert train_losses(resumed) == train_losses(trainer)  # steps 1-3 from the checkpoint, 4-6 recomputed
    assert_same_parameters(fresh, model)


def test_resume_refuses_a_checkpoint_without_the_adapter_files(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    model = adapted("llava")
    trainer = pk.PTPEFTTrainer(model=model, args=arguments(tmp_path), train_dataset=Examples("llava"))
    with pytest.raises(ValueError, match="holds no ptpeft_config.json, but the model carries PT-PEFT parts"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))


def test_load_best_model_at_end_loads_the_best_checkpoints_adapters(tmp_path):
    # "Best" = highest evaluation loss: the loss falls, so the best is the first checkpoint, not the model's
    # final state -- the stock Trainer finds no model.safetensors there and keeps the final state.
    data = Examples("llava", n=8)
    args = arguments(
        tmp_path,
        steps=4,
        save_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=True,
    )
    model = adapted("llava")
    trainer = pk.PTPEFTTrainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-2")
    assert_same_parameters(model, pk.load_adapters(tiny_model("llava"), tmp_path / "checkpoint-2"))


def test_two_stages_on_one_trainer(tmp_path):
    data = Examples("llava")
    model = tiny_model("llava")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    pk.apply_prefix(model, num_prefix=4, reparam_hidden=16)
    trainer = pk.PTPEFTTrainer(model=model, args=arguments(tmp_path / "stage1", steps=3), train_dataset=data)
    trainer.train()
    prefix_after_1 = {k: v.clone() for k, v in model.ptpeft_prefix.state_dict().items()}

    pk.apply_lora(model, r=4, alpha=8)
    with pytest.raises(ValueError, match=r"not in this Trainer's optimizer.*next_stage"):
        trainer.train()  # the stage-1 optimizer would never update the LoRA weights
    with pytest.raises(ValueError, match="previous stage's"):
        trainer.next_stage(output_dir=tmp_path / "stage1", learning_rate=1e-3)
    with pytest.raises(ValueError, match=r"cannot change \['gradient_accumulation_steps'\]"):
        trainer.next_stage(output_dir=tmp_path / "stage2", gradient_accumulation_steps=2)
    trainer.next_stage(output_dir=tmp_path / "stage2", learning_rate=1e-3, max_steps=3)
    trainer.train()

    held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    kinds = pk.integrations.stages.parameter_kinds(model)
    named = dict(model.named_parameters())
    assert held == {id(named[n]) for n, k in kinds.items() if k in ("prefix", "lora")}
    assert {g["initial_lr"] for g in trainer.optimizer.param_groups} == {1e-3}
    assert sorted(train_losses(trainer)) == [1, 2, 3]  # a new run: step count and scheduler restarted
    assert all(not torch.equal(v, prefix_after_1[k]) for k, v in model.ptpeft_prefix.state_dict().items())
    assert all(m.lora_B.weight.abs().sum() > 0 for m in model.modules() if isinstance(m, pk.LoRALinear))
    plain = pk.integrations.hf_save.base_state_dict(model)
    assert plain.keys() == base.keys() and all(torch.equal(plain[k], base[k]) for k in base)
    assert file_tree(tmp_path / "stage2" / "checkpoint-3") == CHECKPOINT_FILES


def test_trainer_refuses_a_trainable_base_with_ptpeft_parts(tmp_path):
    model = adapted("llava")
    model.get_input_embeddings().weight.requires_grad_(True)
    trainer = pk.PTPEFTTrainer(model=model, args=arguments(tmp_path), train_dataset=Examples("llava"))
    with pytest.raises(ValueError, match="base parameters are trainable.*mark_trainable"):
        trainer.train()

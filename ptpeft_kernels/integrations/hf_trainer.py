"""PT-PEFT inside transformers' ``Trainer`` / TRL's ``SFTTrainer``: adapter checkpoints, exact resume, stages.

How transformers' Trainer (5.x) handles model weights, and where this module hooks in:

- **Saving** goes through ``Trainer._save`` -> ``model.save_pretrained(checkpoint_dir)``. A model
  carrying PT-PEFT parts answers that call itself (``hf_save.py``): each ``checkpoint-N/`` holds
  the :func:`~ptpeft_kernels.save_adapters` files (LoRA in PEFT's format, prefixes, adapters)
  next to the Trainer's optimizer, scheduler, RNG and trainer state -- not a copy of the frozen
  base. This needs nothing from the Trainer, so the stock ``Trainer`` and ``SFTTrainer`` already
  write such checkpoints.
- **Loading** (``resume_from_checkpoint``, ``load_best_model_at_end``) goes through
  ``Trainer._load_from_checkpoint`` / ``_load_best_model``. They read model weights either as a
  full state dict (``model.safetensors`` -> ``model.load_state_dict``) or, only when
  ``isinstance(model, peft.PeftModel)``, via ``model.load_adapter``. A transformers model carrying
  our parts is neither a full checkpoint nor a ``PeftModel``, so the stock Trainer refuses the
  adapter checkpoint ("Can't find a valid checkpoint" / "checkpoint index"); a ``TrainerCallback``
  cannot help, because callbacks run after ``_load_from_checkpoint``. The resume side is therefore
  :class:`PTPEFTTrainerMixin`, which overrides exactly those two methods to call
  :func:`~ptpeft_kernels.load_adapters` when the directory holds ``ptpeft_config.json`` (and defers
  to the Trainer otherwise). The optimizer, scheduler, RNG and data-order state are restored by the
  Trainer's own code, so a resumed run ends bit-exact with the uninterrupted one on the CPU.

Use ``pk.PTPEFTTrainer`` in place of ``Trainer``, or mix into any Trainer subclass::

    class PTPEFTSFTTrainer(pk.PTPEFTTrainerMixin, trl.SFTTrainer):
        pass

The two PT-PEFT stages are two ``train()`` calls; :meth:`PTPEFTTrainerMixin.next_stage` starts
the second one on the same Trainer (new arguments, optimizer and scheduler rebuilt over every
trainable parameter: the new LoRA / adapter weights and the prefixes). ``train()`` refuses to run
an optimizer built before new trainable parameters appeared: the Trainer would otherwise keep its
stage-1 optimizer and never update the LoRA weights, silently.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Any

from torch import nn

from .hf_save import base_state_items, has_ptpeft_parts

CONFIG_NAME = "ptpeft_config.json"  # checkpoint.CONFIG_NAME

# The TrainingArguments a stage may change on the same Trainer: what the optimizer, the scheduler, the
# data loader and the save / log schedule read at each train(). The rest was fixed when the Trainer was
# built (its accelerator, mixed precision, distributed set-up); a stage that changes them needs a new
# Trainer.
STAGE_ARGS = (
    "learning_rate",
    "max_steps",
    "num_train_epochs",
    "warmup_steps",
    "lr_scheduler_type",
    "lr_scheduler_kwargs",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "per_device_train_batch_size",
    "save_steps",
    "save_total_limit",
    "logging_steps",
    "eval_steps",
    "seed",
)


def checkpointing_argument(enabled: bool, arguments_class: type | None = None) -> dict[str, bool]:
    """The ``TrainingArguments`` keyword that switches activation (gradient) checkpointing, as a dict.

    transformers 5.23 renamed the field ``gradient_checkpointing`` to ``activation_checkpointing``
    (the old name warns from then on and goes in 6); 5.17 to 5.22 know only the old one, and refuse
    the new. ``TrainingArguments(..., **checkpointing_argument(True))`` works on every release the
    package supports. ``arguments_class``: the class to ask (default ``transformers.TrainingArguments``).
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__} {enabled!r}")
    if arguments_class is None:
        from transformers import TrainingArguments as arguments_class
    names = {f.name for f in dataclasses.fields(arguments_class)}
    for name in ("activation_checkpointing", "gradient_checkpointing"):
        if name in names:
            return {name: enabled}
    raise TypeError(
        f"{arguments_class.__name__} has neither activation_checkpointing nor gradient_checkpointing: "
        f"not a transformers TrainingArguments class"
    )


def is_ptpeft_checkpoint(path: str | os.PathLike) -> bool:
    """Whether directory ``path`` holds :func:`~ptpeft_kernels.save_adapters` files."""
    return (Path(path) / CONFIG_NAME).is_file()


class PTPEFTTrainerMixin:
    """Mix into a ``transformers.Trainer`` subclass, before it: ``class T(PTPEFTTrainerMixin, SFTTrainer)``.

    Resuming (``train(resume_from_checkpoint=path or True)``) and ``load_best_model_at_end``
    load the checkpoint's PT-PEFT files with :func:`~ptpeft_kernels.load_adapters` (into the
    model as built, or creating the parts it lacks); everything else is the Trainer's.
    """

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        self._ptpeft_check_trainable()
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def next_stage(self, *, output_dir: str | os.PathLike, **overrides: Any) -> None:
        """Start the next PT-PEFT stage on this Trainer (call it after adding LoRA / adapters).

        ``output_dir`` (required: stage-2 checkpoints must not mix with stage 1's, or
        ``resume_from_checkpoint=True`` would pick the wrong one) and ``overrides`` (fields of
        :data:`STAGE_ARGS`: ``learning_rate``, ``max_steps``, ...) replace the arguments, in a
        copy (``TrainingArguments`` re-initialises accelerate's global state when constructed);
        the optimizer and scheduler are dropped so that the next ``train()`` builds them over every
        trainable parameter, prefixes included, and the model is re-wrapped (DDP registers the
        parameters that train when it wraps the model).
        """
        if not isinstance(output_dir, (str, os.PathLike)):
            raise TypeError(f"output_dir must be a str or os.PathLike, got {type(output_dir).__name__}")
        if Path(output_dir).resolve() == Path(self.args.output_dir).resolve():
            raise ValueError(
                f"output_dir {str(output_dir)!r} is the previous stage's; give the next stage its own "
                f"directory so that resume_from_checkpoint=True finds its checkpoints, not the last stage's"
            )
        other = sorted(k for k in overrides if k not in STAGE_ARGS)
        if other:
            raise ValueError(
                f"next_stage cannot change {other}: the Trainer was set up with them (accelerator, "
                f"precision, distribution); it changes {list(STAGE_ARGS)}. Build a new Trainer for the next "
                f"stage instead"
            )
        args = copy.copy(self.args)
        args.output_dir = os.path.expanduser(str(output_dir))
        for key, value in overrides.items():
            setattr(args, key, value)
        if "lr_scheduler_type" in overrides:
            from transformers import SchedulerType

            args.lr_scheduler_type = SchedulerType(args.lr_scheduler_type)
        self.args = args
        self.optimizer = None
        self.lr_scheduler = None
        self._created_lr_scheduler = False
        self.model_wrapped = self.model

    # ------------------------------------------------------------------ Trainer hooks

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        target = self._ptpeft_unwrap(self.model if model is None else model)
        if is_ptpeft_checkpoint(resume_from_checkpoint):
            from .checkpoint import load_adapters

            load_adapters(target, resume_from_checkpoint)
            return None
        if has_ptpeft_parts(target):
            raise ValueError(
                f"{resume_from_checkpoint} holds no {CONFIG_NAME}, but the model carries PT-PEFT parts: it "
                f"was not written by save_pretrained of this model (a checkpoint from before apply_prefix / "
                f"apply_lora, or from another model?)"
            )
        return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is not None and is_ptpeft_checkpoint(best):
            from .checkpoint import load_adapters

            load_adapters(self._ptpeft_unwrap(self.model), best)
            return None
        return super()._load_best_model()

    # ------------------------------------------------------------------ checks

    def _ptpeft_unwrap(self, model: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(model)

    def _ptpeft_check_trainable(self) -> None:
        model = self._ptpeft_unwrap(self.model)
        if has_ptpeft_parts(model):
            trainable = [n for n, p in base_state_items(model) if p.requires_grad]
            if trainable:
                raise ValueError(
                    f"{len(trainable)} base parameters are trainable (e.g. {trainable[:3]}), but PT-PEFT "
                    f"checkpoints hold prefixes, LoRA and adapters only: a resumed run would restart them "
                    f"from the pre-trained values. Freeze them with ptpeft_kernels.mark_trainable(model)"
                )
        optimizer = getattr(self, "optimizer", None)
        if optimizer is None:
            return
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]
        if missing:
            raise ValueError(
                f"{len(missing)} trainable parameters (e.g. {missing[:3]}) are not in this Trainer's "
                f"optimizer, which was built before they were added or unfrozen: they would never update. "
                f"For the next PT-PEFT stage call trainer.next_stage(output_dir=..., learning_rate=...) "
                f"first, or build a new Trainer"
            )


def __getattr__(name: str) -> Any:
    # PTPEFTTrainer subclasses transformers.Trainer, whose import takes seconds: build it on first use.
    if name == "PTPEFTTrainer":
        from transformers import Trainer

        cls = type(
            "PTPEFTTrainer",
            (PTPEFTTrainerMixin, Trainer),
            {
                "__module__": __name__,
                "__doc__": "``transformers.Trainer`` with PT-PEFT checkpoints and exact resume "
                "(:class:`PTPEFTTrainerMixin`).",
            },
        )
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

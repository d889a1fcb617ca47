"""``--fsdp``: the run sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``) under ``torchrun``.

Wrapping. Every transformer block — each child of an ``nn.ModuleList`` whose class is one
of the model's ``_no_split_modules`` (the decoder layers of the language model, the vision
tower's encoder layers) — is its own FSDP group; the root group holds the rest (embeddings,
projector, final norm, head) and the prefix bank. The frozen base is sharded like everything
else (FSDP2 shards per parameter, frozen or not, and reduce-scatters only gradients that exist).

The prefix MLP. One :class:`~ptpeft_kernels.PrefixEncoder` serves every layer: each layer's
attention calls ``encoder.layer(i)`` from inside its own block, not through the encoder's
``forward``, so the encoder cannot be a group of its own (FSDP's hooks would never gather it).
It lives in the root group, whose parameters stay gathered from the model's forward to the end
of its backward (FSDP2 does not reshard the root after forward): every layer, and gradient
checkpointing's recomputation, reads the whole MLP, autograd sums its gradient over the layers,
and the root's post-backward reduce-scatters it once per step.

Trainable parameters are sharded, not replicated: LoRA and adapters sit inside the blocks,
in the blocks' groups, so replicating them would mean ``ignored_params`` plus a hand-written
gradient all-reduce — the code this flag exists to avoid. Sharding keeps their AdamW state
at 1/world per rank; the price is that they are gathered with their block (a few MB next to
the block's frozen weights). The prefix MLP is gathered for the whole step either way.

Stages. FSDP2 cannot add parameters to a sharded module, so a stage that adds modules
(prefixes, then LoRA / adapters) rebuilds the model: the trained parameters are gathered
(``DTensor.full_tensor``, only they), the base checkpoint is loaded again on the CPU, the
stages so far are re-applied with the same seeds as a single-process run (so new modules get
the same initial values), the gathered values are copied in and the model is sharded again.

Checkpoints: :mod:`.sharded_checkpoint`. Evaluation: every rank generates its share with
``synced_gpus=True`` (a rank that is done keeps joining the all-gathers), the shares padded
to the same number of batches.
"""

from __future__ import annotations

import contextlib
import gc
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .loop import Trainer, apply_stage
from .sharded_checkpoint import ShardedCheckpoint, save_sharded


def block_modules(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks: children of an ``nn.ModuleList`` whose class is one of
    ``model._no_split_modules`` (decoder layers, vision encoder layers)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            blocks.extend(c for c in module if type(c).__name__ in names)
    return blocks


def ensure_process_group(device: torch.device) -> None:
    """FSDP needs a process group: outside torchrun (one process) make a single-rank one."""
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1
        )


def shard_model(model: nn.Module, device: torch.device, bf16: bool) -> nn.Module:
    """Apply ``fully_shard`` to every block, then to the root; returns ``model`` (sharded in place).

    Under ``bf16`` the gathered parameters are bfloat16 and gradients are reduced in float32
    (the sharded master copies keep their dtype).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    ensure_process_group(device)
    blocks = block_modules(model)
    if not blocks:
        raise ValueError(
            f"--fsdp: found no transformer blocks in {type(model).__name__} (no nn.ModuleList children of "
            f"the classes in its _no_split_modules {getattr(model, '_no_split_modules', None)})"
        )
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16
        else MixedPrecisionPolicy()
    )
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    # generate() reaches root-group parameters outside forward (LLaVA's get_image_features runs
    # the vision embeddings first): gather the root for the whole call.
    if hasattr(model, "generate"):
        register_fsdp_forward_method(model, "generate")
    return model


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def gather_trained(model: nn.Module) -> dict[str, torch.Tensor]:
    """Collective: full (unsharded) CPU copies of the added parameters (prefixes, LoRA, adapters)."""
    from ..integrations.stages import parameter_kinds

    named = dict(model.named_parameters())
    out = {}
    for name, kind in parameter_kinds(model).items():
        if kind == "base":
            continue
        p = named[name]
        full = p.full_tensor() if _is_dtensor(p) else p
        out[name] = full.detach().cpu().clone()
    return out


@contextlib.contextmanager
def full_added_parameters(model: nn.Module) -> Iterator[None]:
    """Collective: within the block, the added parameters are plain full tensors (so code that reads
    them, such as ``save_adapters``, works unchanged); the sharded ones are put back afterwards."""
    from ..integrations.stages import parameter_kinds

    swapped = []
    try:
        for name, kind in parameter_kinds(model).items():
            if kind == "base":
                continue
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            p = owner._parameters[attr]
            if _is_dtensor(p):
                full = nn.Parameter(p.full_tensor().detach(), requires_grad=p.requires_grad)
                owner._parameters[attr] = full
                swapped.append((owner, attr, p))
        yield
    finally:
        for owner, attr, p in swapped:
            owner._parameters[attr] = p


class _Sharded:
    """What the training loop calls: the sharded model, with ``no_sync`` for gradient accumulation
    (FSDP2 keeps the micro-batches' gradients unsharded and reduce-scatters once, at the last)."""

    def __init__(self, model: nn.Module) -> None:
        self.module = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        self.module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.module.set_requires_gradient_sync(True)


class FSDPTrainer(Trainer):
    """The :class:`~.loop.Trainer` over an FSDP2-sharded model (see the module docstring)."""

    def __init__(self, *args: Any, build_base: Callable[[], nn.Module], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.build_base = build_base
        self.model = self._shard(self.model)

    def _shard(self, model: nn.Module) -> nn.Module:
        model.eval()
        return shard_model(model, self.dist.device, self.cfg.bf16)

    # ------------------------------------------------------------------ hooks of Trainer

    def _apply_stages(self, first: int, last: int) -> None:
        if last <= first:
            return
        carry = gather_trained(self.model) if first > 0 else {}
        # Free the sharded model (and its device memory) before the base is loaded again.
        self.model = None
        gc.collect()
        if self.dist.device.type == "cuda":
            torch.cuda.empty_cache()
        model = self.build_base()
        for si in range(last):
            torch.manual_seed(self.cfg.seed * 1000 + si)
            apply_stage(model, self.cfg.stages[si], self.cfg)
        named = dict(model.named_parameters())
        missing = sorted(set(carry) - set(named))
        if missing:
            raise RuntimeError(f"--fsdp: the rebuilt model lacks trained parameters {missing[:4]}")
        with torch.no_grad():
            for name, value in carry.items():
                named[name].copy_(value.to(named[name].dtype))
        self.model = self._shard(model)

    def _wrap_for_training(self, model: nn.Module, stage) -> _Sharded:
        return _Sharded(model)

    def _load_optimizer(self, opt: torch.optim.Optimizer, opt_state: Any) -> None:
        if not isinstance(opt_state, ShardedCheckpoint):
            raise ValueError("--fsdp: the checkpoint holds no sharded optimizer state")
        opt_state.load_optimizer(self.model, opt)

    def _save(self, global_step: int, opt, sched, state: dict, params: bool = True) -> None:
        tensors = {n: p for n, p in self._trainable()} if params else {}
        save_sharded(
            self.run_dir,
            global_step,
            self.model,
            tensors,
            opt,
            sched,
            {**state, "metrics_lines": self.log.lines, "fingerprint": self.base_fingerprint},
            is_main=self.dist.is_main,
        )

    def _load_params(self, ck: ShardedCheckpoint) -> None:
        ck.load_params({n: p for n, p in self._trainable()})

    def _write_stage_output(self, stage) -> None:
        # Every rank joins the gathers; rank 0 writes today's formats (save_adapters / save_pretrained).
        from .loop import integration_api

        out = self.run_dir / stage.name
        if stage.kind == "full":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            full = get_model_state_dict(self.model, options=options)
            if self.dist.is_main:
                self.model.save_pretrained(out, state_dict=full)
            return
        with full_added_parameters(self.model):
            if self.dist.is_main:
                integration_api().save_adapters(self.model, out)

    # ------------------------------------------------------------------ evaluation in step

    @torch.no_grad()
    def evaluate(self) -> tuple[dict[str, float], dict[Any, str]]:
        """Every rank generates its share; shares are padded to equal batch counts (FSDP's all-gathers
        need every rank in every forward) and ``synced_gpus`` keeps finished ranks stepping."""
        from .data import model_inputs

        model = self.model
        model.eval()
        world, rank, bs = self.dist.world_size, self.dist.rank, self.cfg.eval_batch_size
        mine = self.data.eval[rank::world]
        per_rank = math.ceil(len(self.data.eval) / world)
        padded = mine + [self.data.eval[0]] * (per_rank - len(mine))
        tok = getattr(self.processor, "tokenizer", self.processor)
        preds: dict[Any, str] = {}
        for start in range(0, len(padded), bs):
            chunk = padded[start : start + bs]
            batch = self.gen_collator(chunk)
            inputs = model_inputs(batch, self.dist.device)
            with self._autocast():
                out = model.generate(
                    **inputs,
                    max_new_tokens=self.cfg.max_new_tokens,
                    num_beams=self.cfg.num_beams,
                    do_sample=False,
                    pad_token_id=self.pad_id,
                    synced_gpus=world > 1,
                )
            new = out[:, inputs["input_ids"].shape[1] :]
            texts = tok.batch_decode(new, skip_special_tokens=True)
            for i, (key, text) in enumerate(zip(batch["keys"], texts, strict=False)):
                if start + i < len(mine):  # the padding's predictions are dropped
                    preds[key] = text.strip().split("\n")[0].strip()
        return self._score_predictions(preds)

    @torch.no_grad()
    def representation(self, name: str = "eval") -> dict[str, Any] | None:
        if self.cfg.rank_samples == 0:
            return None
        if not self.dist.is_main:
            from ..analysis.measures import fixed_length_features

            # The same forwards as rank 0's (each set in the same order), for the all-gathers;
            # rank 0 computes the measures.
            for examples in (self.data.eval, self.data.rank_pretrain):
                if examples:
                    fixed_length_features(
                        self.model,
                        self._rank_batches(examples),
                        self.cfg.rank_length,
                        self.pad_id,
                        self.dist.device,
                    )
            return None
        return super().representation(name)

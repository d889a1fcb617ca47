"""``--estimate-memory``: the per-GPU memory of a run, before the run (no weights, no data, no training).

How. The model is built from its config on fake tensors (``torch``'s ``FakeTensorMode``:
meta-device tensors with shapes and no memory; ``--model`` may hold only ``config.json``, or
name a reference config: :mod:`.reference_configs`) and the method's modules are added (the
last stage: the most trainable parameters, e.g. prefixes + LoRA).
Weights, trainable parameters, gradients and AdamW states are counted from its parameters
(4-bit NF4: 0.5 byte per weight of every ``nn.Linear`` but the output head, plus one float32
scale per 64 weights, or 8 bits per 64 and a float32 per 256 x 64 with ``--double-quant``).

Activations are *simulated*: the training step the driver runs — the language model over the
micro-batch's sequence of embeddings (its real size: fake tensors cost no memory), the head,
the float32 cross-entropy, the backward, gradient clipping and the AdamW step, in the steady
state (the optimizer's states allocated before) — runs on those fake tensors under a dispatch
mode that adds up the bytes of every tensor storage created and subtracts them when the storage
is freed (a weakref on the storage). The peaks of the forward/backward and of the optimizer step
are taken apart; what the first holds beyond weights, optimizer states and gradients is the
activations (with the logits and the step's temporaries). Attention runs the library's CPU
path, which keeps O(N) per head like its GPU kernels (flash-style, no N x N scores); the vision
tower is frozen and receives no gradient in PT-PEFT (``--prefix-targets language_model``),
so its activations are not kept: only its weights are counted.

FSDP (``--fsdp``, world size W): weights, trainable parameters, gradients and optimizer
states are divided by W; the gathered working set is added — the root group (embeddings,
head, projector, vision embeddings, prefix MLP) for the whole step, and two transformer
blocks (the one computing and the one prefetched), in bf16 under ``--bf16``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

GiB = 2**30
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TEXT_TOKENS = 64  # prompt + answer tokens beside the image tokens, when --seq-len is not given


# ----------------------------------------------------------------------------------- live bytes


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages alive now (``live``) and at most (``peak``) while active.

    Every op's output storage is counted once when first seen and released when its last tensor
    dies (``weakref.finalize`` on the storage object, which PyTorch keeps alive exactly as long
    as the storage). Works on meta and fake tensors: their storages have sizes but no memory.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._seen:
            return
        self._seen.add(key)
        n = storage.nbytes()
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, key, n)

    def _release(self, key: int, n: int) -> None:
        self._seen.discard(key)
        self.live -= n

    def reset_peak(self) -> None:
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


# ----------------------------------------------------------------------------------- the model


def estimate_config(args: argparse.Namespace) -> tuple[Any, str, int]:
    """``(transformers config, description, default tokens per example)`` of the run's model."""
    from .reference_configs import REFERENCE_CONFIGS, reference_config

    if args.model is None:
        from .builtin_model import build_config, build_tokenizer, spec_with

        spec = spec_with(args.builtin_preset)
        config = build_config(spec, build_tokenizer())
        image_tokens = (spec.image_size // spec.patch_size) ** 2
        return config, f"built-in ({args.builtin_preset})", image_tokens + TEXT_TOKENS
    if args.model in REFERENCE_CONFIGS:
        config, image_tokens = reference_config(args.model)
        return config, f"{args.model} (reference config)", image_tokens + TEXT_TOKENS
    path = Path(args.model)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"--model {args.model}: expected a directory with a config.json (weights are not needed) or "
            f"one of the reference configs {', '.join(REFERENCE_CONFIGS)}"
        )
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    vision = getattr(config, "vision_config", None)
    size, patch = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
    image_tokens = (size // patch) ** 2 if isinstance(size, int) and isinstance(patch, int) else 576
    return config, str(path), image_tokens + TEXT_TOKENS


def _stage_kinds(method: str) -> list[str]:
    return ["prefix", method.split("-", 1)[1]] if method.startswith("pt-") else [method]


def fake_model(config: Any, dtype: torch.dtype, args: argparse.Namespace) -> nn.Module:
    """The model on fake tensors with the method's modules added (all stages, the last one trainable).

    Call inside a ``FakeTensorMode`` (transformers skips its data-dependent checks on fake tensors,
    where meta tensors would fail on them)."""
    from transformers import AutoModelForImageTextToText

    from .config import StagePlan
    from .loop import apply_stage

    model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    kinds = _stage_kinds(args.method)
    for i, kind in enumerate(kinds):
        train_prefix = kind == "prefix" or (i > 0 and args.method.startswith("pt-"))
        apply_stage(model, StagePlan(kind, kind, 1, None, 1.0, train_prefix), args)
    return model


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _nf4_bytes(numel: int, double_quant: bool) -> float:
    # 4-bit codes, plus per block of 64 one float32 scale, or one 8-bit scale and a float32 per 256 blocks.
    scales = numel / 64 * (1 + 4 / 256) if double_quant else numel / 64 * 4
    return numel / 2 + scales


def weight_bytes(model: nn.Module, load_in_4bit: bool, double_quant: bool) -> dict[str, float]:
    """Bytes of the frozen base by storage kind ("nf4": the quantised ``nn.Linear`` weights, every
    Linear but the output head, as transformers' bitsandbytes integration quantises them)."""
    from ..integrations.stages import parameter_kinds

    kinds = parameter_kinds(model)
    head = model.get_output_embeddings()
    quantised = set()
    if load_in_4bit:
        quantised = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear) and m is not head}
    out: dict[str, float] = {}
    for name, p in model.named_parameters():
        if kinds[name] != "base" or p.requires_grad:
            continue
        if id(p) in quantised:
            out["nf4"] = out.get("nf4", 0.0) + _nf4_bytes(p.numel(), double_quant)
        else:
            key = str(p.dtype).replace("torch.", "")
            out[key] = out.get(key, 0.0) + p.numel() * p.element_size()
    buffers = _bytes(model.buffers())
    if buffers:
        out["buffers"] = float(buffers)
    return out


# ----------------------------------------------------------------------------------- simulation


@dataclass
class StepSim:
    tokens: int
    held: int  # bytes held before the step: weights, buffers, optimizer states
    peak: int  # bytes held at the peak of the forward and backward (and gradient clipping)
    after_forward: int  # bytes held when the loss is computed (activations kept for the backward)
    optimizer_peak: int  # bytes held at the peak of the AdamW step


def simulate_step(
    model: nn.Module, batch: int, tokens: int, checkpointing: bool, max_grad_norm: float = 1.0
) -> StepSim:
    """A training step of the language model over ``batch`` x ``tokens`` embeddings (inside
    ``FakeTensorMode``) in the steady state (AdamW's states allocated first); its bytes."""
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    hidden = head.in_features
    dtype = head.weight.dtype
    params = [p for p in model.parameters() if p.requires_grad]
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    with LiveBytes() as mem:
        for t in [*model.parameters(), *model.buffers()]:
            mem.track(t)
        # foreach: the GPU default (one temporary per parameter list), and a tenth of the ops to simulate.
        opt = torch.optim.AdamW(params, lr=1e-3, foreach=True)
        # Steady state without a first forward: the optimizer's states exist before the measured step.
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
        held = mem.live
        mem.reset_peak()
        if True:  # one step, measured in two phases
            embeds = torch.zeros(batch, tokens, hidden, dtype=dtype)
            labels = torch.zeros(batch, tokens, dtype=torch.long)
            out = decoder(inputs_embeds=embeds, use_cache=False)
            logits = head(out[0])
            # As the driver computes it: the float32 copy of the logits is a temporary of the call.
            vocab = logits.shape[-1]
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, vocab), labels[:, 1:].reshape(-1), reduction="sum"
            )
            after_forward = mem.live
            loss.backward()
            del out, logits, loss, embeds, labels
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            # Two phases, fitted apart: which one holds the most depends on the tokens (activations)
            # against the trainable parameters (the optimizer's temporaries), not linearly.
            peak = mem.peak
            mem.reset_peak()
            opt.step()
            result = StepSim(batch * tokens, held, peak, after_forward, mem.peak)
        opt.zero_grad(set_to_none=True)
        del opt
    if checkpointing:
        model.gradient_checkpointing_disable()
    return result


# ----------------------------------------------------------------------------------- the estimate


def _block_bytes(model: nn.Module) -> tuple[int, int]:
    """(largest transformer block's parameter bytes, bytes of everything outside the blocks)."""
    from .fsdp import block_modules

    blocks = block_modules(model)
    inside = {id(p) for b in blocks for p in b.parameters()}
    largest = max((_bytes(b.parameters()) for b in blocks), default=0)
    outside = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in inside)
    return largest, outside


def _prefix_kv_bytes(model: nn.Module, tokens_batch: int) -> int:
    from ..integrations.prefix import get_prefix_bank

    bank = get_prefix_bank(model)
    if bank is None:
        return 0
    total = 0
    for enc in bank.encoders.values():
        total += enc.num_layers * 2 * enc.num_kv_heads * enc.num_prefix * enc.head_dim * 4
    return total


def estimate(args: argparse.Namespace) -> dict[str, Any]:
    """The estimate as a dict of bytes (see the module docstring); :func:`format_estimate` prints it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    config, desc, default_tokens = estimate_config(args)
    with FakeTensorMode():
        return _estimate(args, config, desc, default_tokens)


def _estimate(args: argparse.Namespace, config: Any, desc: str, default_tokens: int) -> dict[str, Any]:
    world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    if args.batch_size % (args.grad_accum * world):
        raise ValueError(
            f"--batch-size {args.batch_size} must be divisible by --grad-accum {args.grad_accum} x "
            f"{world} processes (it is the global batch)"
        )
    micro = args.batch_size // (args.grad_accum * world)
    seq = args.seq_len or default_tokens
    tokens = micro * seq
    dtype = DTYPES[args.dtype]
    compute = torch.bfloat16 if args.bf16 else dtype
    model = fake_model(config, dtype, args)
    trainable = [p for p in model.parameters() if p.requires_grad]
    weights = weight_bytes(model, args.load_in_4bit, args.double_quant)
    w_total = sum(weights.values())
    t_bytes = _bytes(trainable)
    if args.load_in_4bit:
        # LoRA over a Linear4bit is float32 (a packed weight has no float dtype to copy).
        from ..integrations.stages import parameter_kinds

        named = dict(model.named_parameters())
        lora = [named[n] for n, k in parameter_kinds(model).items() if k == "lora"]
        t_bytes += sum(p.numel() * (4 - p.element_size()) for p in lora)
    grads = t_bytes
    optim = 2 * t_bytes  # AdamW's exp_avg and exp_avg_sq, in each parameter's dtype
    sim_model = model if compute == dtype else fake_model(config, compute, args)
    sim_trainable = float(_bytes(p for p in sim_model.parameters() if p.requires_grad))
    to_real = t_bytes / sim_trainable if sim_trainable else 1.0
    steps = {ckpt: simulate_step(sim_model, micro, seq, ckpt, args.max_grad_norm) for ckpt in (False, True)}
    per_token = {ckpt: (st.after_forward - st.held) / tokens for ckpt, st in steps.items()}
    step = steps[bool(args.gradient_checkpointing)]
    # At the forward/backward peak: the gradients so far (counted as all of them, in the real dtype and
    # sharded under FSDP) and everything else, which is the tokens' (activations, logits, temporaries).
    activations = max(0.0, step.peak - step.held - sim_trainable)
    largest_block, outside = _block_bytes(model)
    gathered = 0.0
    if args.fsdp:
        scale = torch.tensor([], dtype=compute).element_size() / max(1, dtype.itemsize)
        gathered = (outside + 2 * largest_block) * scale
        shard = 1.0 / world
    else:
        shard = 1.0
    dequant = 0.0
    if args.load_in_4bit:
        biggest = max((m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)), default=0)
        dequant = biggest * torch.tensor([], dtype=compute).element_size()  # one weight dequantised at a time
    # What the step holds beyond weights and optimizer states at its peak: the larger of the forward/
    # backward phase (gradients and other token-independent buffers, shardable, plus the activations)
    # and the optimizer phase (gradients and AdamW's temporaries, shardable).
    fb = grads * shard + activations
    opt_phase = max(0.0, step.optimizer_peak - step.held) * to_real * shard
    in_backward = fb >= opt_phase
    rest = fb - activations if in_backward else opt_phase
    total = (w_total + t_bytes + optim) * shard + max(fb, opt_phase) + gathered + dequant
    result = {
        "model": desc,
        "method": args.method,
        "stage": " + ".join(_stage_kinds(args.method)),
        "world_size": world,
        "fsdp": bool(args.fsdp),
        "micro_batch": micro,
        "seq_len": seq,
        "gradient_checkpointing": bool(args.gradient_checkpointing),
        "weights_by_kind": weights,
        "weights": w_total * shard,
        "trainable_params": sum(p.numel() for p in trainable),
        "trainable": t_bytes * shard,
        "gradients": grads * shard,
        "optimizer": optim * shard,
        "step_rest": rest,
        "peak_phase": "forward/backward" if in_backward else "optimizer step",
        "activation_per_token": per_token[False],
        "activation_per_token_checkpointing": per_token[True],
        "activations": activations,
        "prefix_kv": _prefix_kv_bytes(model, tokens),
        "gathered": gathered,
        "dequant": dequant,
        "total": total,
        "gpu_memory_gb": args.gpu_memory_gb,
        "fits": None if args.gpu_memory_gb is None else total <= args.gpu_memory_gb * GiB,
    }
    return result


def _gb(x: float) -> str:
    return f"{x / GiB:8.2f} GB" if x >= 0.01 * GiB else f"{x / 2**20:8.2f} MB"


def format_estimate(r: dict[str, Any]) -> str:
    mode = f"FSDP over {r['world_size']}" if r["fsdp"] else f"{r['world_size']} process(es), unsharded"
    kinds = ", ".join(f"{k} {_gb(v).strip()}" for k, v in r["weights_by_kind"].items())
    lines = [
        f"memory estimate per GPU: {r['model']}, {r['method']} (trainable in the last stage: {r['stage']})",
        f"  {mode}; micro-batch {r['micro_batch']} x {r['seq_len']} tokens; gradient checkpointing "
        f"{'on' if r['gradient_checkpointing'] else 'off'}",
        f"  base weights        {_gb(r['weights'])}   ({kinds} in all)",
        f"  trainable           {_gb(r['trainable'])}   ({r['trainable_params']:,} parameters)",
        f"  gradients           {_gb(r['gradients'])}",
        f"  optimizer (AdamW)   {_gb(r['optimizer'])}",
        f"  activations         {_gb(r['activations'])}   per micro-batch token: "
        f"{r['activation_per_token'] / 2**10:.1f} KB, "
        f"{r['activation_per_token_checkpointing'] / 2**10:.1f} KB with gradient checkpointing",
        f"    of which prefix KV {_gb(r['prefix_kv'])}   (all layers' key/value prefixes, float32)",
        f"  step temporaries    {_gb(r['step_rest'])}   (gradients, other buffers; the peak is in the "
        f"{r['peak_phase']})",
    ]
    if r["fsdp"]:
        lines.append(f"  gathered by FSDP    {_gb(r['gathered'])}   (root group + 2 blocks, unsharded)")
    if r["dequant"]:
        lines.append(f"  4-bit dequant       {_gb(r['dequant'])}   (the largest weight, dequantised)")
    lines.append(f"  total               {_gb(r['total'])}")
    if r["gpu_memory_gb"] is not None:
        verdict = "fits" if r["fits"] else "does NOT fit"
        lines.append(f"  {verdict} in {r['gpu_memory_gb']:g} GB per GPU")
    return "\n".join(lines)


def run_estimate(args: argparse.Namespace) -> dict[str, Any]:
    """``--estimate-memory``: print the estimate and return it (also as JSON-able floats)."""
    with contextlib.redirect_stderr(open(os.devnull, "w")):  # noqa: SIM115 - transformers' init warnings
        result = estimate(args)
    print(format_estimate(result), flush=True)
    return result


__all__ = ["LiveBytes", "StepSim", "estimate", "format_estimate", "run_estimate", "simulate_step"]

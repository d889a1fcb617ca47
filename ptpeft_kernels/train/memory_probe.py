"""Measured CPU memory: the peak of the bytes the c10 CPU allocator holds over a region of code.

``torch.cuda.max_memory_allocated`` has no CPU counterpart, and the process's resident set
(``ru_maxrss``) is dominated by the libraries (hundreds of MB against the kilobytes of a
tiny model). The c10 CPU allocator however reports every allocation and free, with its size,
to the PyTorch profiler when it records memory (``profile_memory=True``); replaying those
events in time order gives the bytes held at every instant, hence the peak. What the profiler
sees is every tensor storage made by PyTorch's own allocator on the CPU — tensors from torch
ops, autograd, optimizers, ``transformers`` and bitsandbytes (which allocates through torch).
It misses memory-mapped storages (safetensors reads them, the copies into parameters are
counted) and memory that native libraries allocate on their own (BLAS workspaces). One
unexplained case: inside a long xdist worker, the trace of a float32 checkpoint load held half
of the 3.92 MB it held in a fresh process; cross-check a trace against the sizes of the
tensors it must hold, as the tests do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch


@dataclass
class AllocatorTrace:
    """Bytes allocated minus freed since the region began: ``peak`` (its maximum) and ``net`` (at the end)."""

    peak: int = 0
    net: int = 0
    allocations: int = 0
    events: list[tuple[int, int]] = field(default_factory=list, repr=False)


def _allocation_events(prof) -> list[tuple[int, int]]:
    """(time ns, +bytes allocated / -bytes freed) of every CPU allocator event, in time order."""
    alloc_type = torch._C._profiler._EventType.Allocation
    out: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        kind, data = node.typed
        if kind == alloc_type and data.device.type == "cpu":
            out.append((node.start_time_ns, int(data.alloc_size)))
        stack.extend(node.children)
    out.sort()
    return out


@contextlib.contextmanager
def cpu_allocator_peak() -> Iterator[AllocatorTrace]:
    """Trace the CPU allocator over the ``with`` block; the yielded trace is filled on exit.

    Memory held before the block is not counted (a free of it counts negative), so wrap the
    whole life of what is measured: building the model, the optimizer, the step.
    """
    from torch.profiler import ProfilerActivity, profile

    trace = AllocatorTrace()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield trace
    events = _allocation_events(prof)
    held = 0
    for _, size in events:
        held += size
        trace.peak = max(trace.peak, held)
    trace.net = held
    trace.allocations = sum(1 for _, s in events if s > 0)
    trace.events = events


def measure_training_peak(
    config,
    method_args,
    micro_batch: int,
    seq_len: int,
    *,
    checkpointing: bool = False,
    steps: int = 2,
    seed: int = 0,
) -> AllocatorTrace:
    """The CPU allocator's peak over building a LLaVA-style model from ``config`` (random weights),
    adding the method's modules (:func:`~.estimate.fake_model`'s recipe) and ``steps`` training steps
    of the driver's loss on a micro-batch of ``micro_batch`` examples of ``seq_len`` tokens (image
    tokens first, then text) with random images: what ``--estimate-memory`` predicts, measured."""
    import torch.nn.functional as F
    from transformers import AutoModelForImageTextToText

    from .config import StagePlan
    from .estimate import _stage_kinds
    from .loop import apply_stage

    torch.manual_seed(seed)
    vision = config.vision_config
    n_image = (vision.image_size // vision.patch_size) ** 2
    if seq_len <= n_image:
        raise ValueError(f"seq_len {seq_len} must exceed the {n_image} image tokens")
    image_id = config.image_token_id
    vocab = config.text_config.vocab_size
    with cpu_allocator_peak() as trace:
        model = AutoModelForImageTextToText.from_config(config)
        kinds = _stage_kinds(method_args.method)
        for i, kind in enumerate(kinds):
            train_prefix = kind == "prefix" or (i > 0 and method_args.method.startswith("pt-"))
            apply_stage(model, StagePlan(kind, kind, 1, None, 1.0, train_prefix), method_args)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        text = torch.randint(0, vocab, (micro_batch, seq_len - n_image))
        text[text == image_id] = 0
        ids = torch.cat([torch.full((micro_batch, n_image), image_id), text], dim=1)
        pixels = torch.rand(micro_batch, 3, vision.image_size, vision.image_size)
        for _ in range(steps):
            out = model(input_ids=ids, pixel_values=pixels, use_cache=False)
            logits = out.logits
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
            )
            del out, logits
            loss.backward()
            del loss
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        del opt, params, model
    return trace

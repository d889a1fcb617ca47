"""Measured CPU memory: the peak of the bytes the c10 CPU allocator holds over a region of code.

``torch.cuda.max_memory_allocated`` has no CPU counterpart, and the process's resident set
(``ru_maxrss``) is dominated by the libraries (hundreds of MB against the kilobytes of a
tiny model). The c10 CPU allocator however reports every allocation and free, with its size,
to the PyTorch profiler when it records memory (``profile_memory=True``); replaying those
events in time order gives the bytes held at every instant, hence the peak. What the profiler
sees is every tensor storage made by PyTorch's own allocator on the CPU — tensors from torch
ops, autograd, optimizers, ``transformers`` and bitsandbytes (which allocates through torch).
It misses memory-mapped storages (safetensors reads them, the copies into parameters are
counted) and memory that native libraries allocate on their own (BLAS workspaces).
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

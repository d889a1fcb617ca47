"""Resumable checkpoints of an FSDP2-sharded run, written with ``torch.distributed.checkpoint``.

Layout under the run directory (the same names as :mod:`.checkpoint`, so ``latest`` and the
step folders read alike)::

    checkpoints/step-000120/.metadata, __0_0.distcp, ...   DCP: every rank writes its shards of
                                                            the trained parameters ("model") and of
                                                            the optimizer state ("optim")
                           rng.safetensors                 rank 0's torch generator states
                           state.json                      as in checkpoint.py, plus "sharded": true
    checkpoints/latest                                     the newest complete checkpoint

The commit is the same as the single-process one: all ranks write into ``.step-N.tmp``;
after a barrier rank 0 adds the RNG and ``state.json``, flushes every file, renames the
folder into place and only then replaces ``latest`` (temp file + ``os.replace``). A rank
killed at any instant of the save therefore leaves ``latest`` naming the previous, complete
checkpoint; the stale temporary folder is removed by the next save.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from .checkpoint import commit_checkpoint, latest_checkpoint_dir, rng_state, set_rng_state


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_sharded(
    run_dir: str | os.PathLike,
    global_step: int,
    model: torch.nn.Module,
    params: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    state: dict[str, Any],
    *,
    is_main: bool,
    keep: int = 1,
) -> Path:
    """Collective: every rank calls it. Writes ``params`` (name -> sharded DTensor) and the optimizer
    state with DCP, then rank 0 commits the folder and points ``latest`` at it; returns its path."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    root = Path(run_dir) / "checkpoints"
    name = f"step-{global_step:07d}"
    final = root / name
    tmp = root / f".{name}.tmp"  # one name for all ranks: they write into the same folder
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    content: dict[str, Any] = {}
    if params:
        content["model"] = dict(params)
    if optimizer is not None:
        content["optim"] = get_optimizer_state_dict(model, optimizer)
    if content:
        dcp.save(content, checkpoint_id=str(tmp))
    _barrier()
    if is_main:
        rng_tensors, rng_meta = rng_state()
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        full_state = {
            **state,
            "global_step": global_step,
            "sharded": True,
            "has_params": bool(params),
            "has_optimizer": optimizer is not None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": rng_meta,
        }
        with open(tmp / "state.json", "w") as fh:
            json.dump(full_state, fh)
        commit_checkpoint(tmp, final, keep)
    _barrier()
    return final


class ShardedCheckpoint:
    """A committed sharded checkpoint: ``state`` (JSON) and loaders for its parameters / optimizer.

    ``params`` is truthy when trained parameters were saved; :meth:`optimizer_state` gives a
    handle that :func:`load_optimizer` reads (the optimizer state is loaded into a live,
    sharded optimizer, not returned as a dict).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.state = json.loads((path / "state.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"--resume: checkpoint {path} is unreadable ({exc})") from None
        if not self.state.get("sharded"):
            raise ValueError(
                f"--resume: checkpoint {path} was written by a run without --fsdp; resume it without --fsdp"
            )
        if (self.state["has_params"] or self.state["has_optimizer"]) and not (path / ".metadata").is_file():
            raise ValueError(f"--resume: checkpoint {path} is corrupt (no DCP .metadata)")
        try:
            self.rng_tensors = load_file(str(path / "rng.safetensors"))
        except Exception as exc:  # safetensors raises its own error types for truncated files
            raise ValueError(f"--resume: checkpoint {path} is corrupt ({exc})") from None
        self.params = bool(self.state["has_params"])

    def optimizer_state(self) -> ShardedCheckpoint | None:
        return self if self.state["has_optimizer"] else None

    def restore_rng(self) -> None:
        set_rng_state(self.rng_tensors, self.state["rng"])

    def load_params(self, params: dict[str, torch.Tensor]) -> None:
        """Collective: load the saved values into ``params`` (name -> live sharded parameter) in place."""
        import torch.distributed.checkpoint as dcp

        content = {"model": dict(params)}
        try:
            dcp.load(content, checkpoint_id=str(self.path))
        except Exception as exc:  # DCP reports missing keys / shape mismatches as CheckpointException
            raise ValueError(
                f"--resume: checkpoint {self.path} does not fit this model's trained parameters ({exc})"
            ) from None

    def load_optimizer(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Collective: restore the optimizer state (sharded like the parameters)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        content = {"optim": get_optimizer_state_dict(model, optimizer)}
        dcp.load(content, checkpoint_id=str(self.path))
        set_optimizer_state_dict(model, optimizer, content["optim"])


def latest_sharded_checkpoint(run_dir: str | os.PathLike) -> ShardedCheckpoint | None:
    path = latest_checkpoint_dir(run_dir)
    return None if path is None else ShardedCheckpoint(path)

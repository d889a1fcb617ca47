"""Resumable checkpoints, written atomically.

Layout under the run directory::

    checkpoints/step-000120/params.safetensors     the parameters to restore (trained / added ones)
                           optimizer.safetensors  optimizer + scheduler tensors
                           rng.safetensors        torch CPU / CUDA generator states
                           state.json             stage, step, data position, Python/NumPy RNG,
                                                  optimizer param groups, scheduler state, history
    checkpoints/latest                            the name of the newest complete checkpoint

A checkpoint is written into a temporary folder, flushed, renamed into place, and only then
``latest`` is replaced (temp file + ``os.replace``), so a process killed at any instant
leaves ``latest`` naming a complete checkpoint. Older checkpoints are then removed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

LATEST = "latest"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------- RNG


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    py = random.getstate()
    meta: dict[str, Any] = {"python": [py[0], list(py[1]), py[2]]}
    try:
        import numpy as np

        st = np.random.get_state()
        meta["numpy"] = [st[0], st[1].tolist(), int(st[2]), int(st[3]), float(st[4])]
    except ImportError:  # pragma: no cover - numpy comes with torch in practice
        pass
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
        if states:
            torch.cuda.set_rng_state_all(states)
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "numpy" in meta:
        import numpy as np

        v = meta["numpy"]
        np.random.set_state((v[0], np.array(v[1], dtype=np.uint32), v[2], v[3], v[4]))


# ----------------------------------------------------------------------------------- optimizer


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = t
    for idx, st in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}


# ----------------------------------------------------------------------------------- save / load


def save_checkpoint(
    run_dir: str | os.PathLike,
    global_step: int,
    params: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    state: dict[str, Any],
    keep: int = 1,
) -> Path:
    """Write a complete checkpoint and point ``latest`` at it; returns its folder."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{global_step:07d}"
    final = root / name
    tmp = root / f".{name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in params.items()}, str(tmp / "params.safetensors"))
    opt_meta: dict[str, Any] = {}
    if optimizer is not None:
        opt_tensors, opt_meta = _flatten_optimizer(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    rng_tensors, rng_meta = rng_state()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    full_state = {
        **state,
        "global_step": global_step,
        "optimizer": opt_meta,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng_meta,
    }
    with open(tmp / "state.json", "w") as fh:
        json.dump(full_state, fh)
    return commit_checkpoint(tmp, final, keep)


def fsync_tree(path: Path) -> None:
    """Flush every file directly in ``path``, then ``path`` itself (its entries)."""
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def commit_checkpoint(tmp: Path, final: Path, keep: int) -> Path:
    """Flush the written folder ``tmp``, rename it into place as ``final``, point ``latest`` at it,
    then drop all but the ``keep`` newest ``step-*`` folders; returns ``final``. Both checkpoint
    kinds end so."""
    fsync_tree(tmp)
    root = final.parent
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    atomic_write_text(root / LATEST, final.name + "\n")
    _fsync_dir(root)
    # Older complete checkpoints go only after ``latest`` names the new one.
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p != final)
    for old in done[: max(0, len(done) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


class Checkpoint:
    """A loaded checkpoint: ``state`` (JSON), ``params`` and the optimizer / RNG tensors."""

    def __init__(self, path: Path) -> None:
        self.path = path
        state_file = path / "state.json"
        try:
            self.state = json.loads(state_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"--resume: checkpoint {path} is unreadable ({exc})") from None
        try:
            self.params = load_file(str(path / "params.safetensors"))
            self.rng_tensors = load_file(str(path / "rng.safetensors"))
            opt = path / "optimizer.safetensors"
            self.optimizer_tensors = load_file(str(opt)) if opt.is_file() else None
        except Exception as exc:  # safetensors raises its own error types for truncated files
            raise ValueError(f"--resume: checkpoint {path} is corrupt ({exc})") from None

    def optimizer_state(self) -> dict | None:
        if self.optimizer_tensors is None:
            return None
        return _unflatten_optimizer(self.optimizer_tensors, self.state["optimizer"])

    def restore_rng(self) -> None:
        set_rng_state(self.rng_tensors, self.state["rng"])


def latest_checkpoint_dir(run_dir: str | os.PathLike) -> Path | None:
    """The directory ``run_dir``'s ``latest`` pointer names (plain and sharded checkpoints alike),
    or ``None`` if it has no checkpoint yet."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = root / name
    if not path.is_dir():
        raise ValueError(f"--resume: {pointer} names {name}, which does not exist")
    return path


def latest_checkpoint(run_dir: str | os.PathLike) -> Checkpoint | None:
    """The newest complete checkpoint of ``run_dir``, or ``None`` if it has none."""
    path = latest_checkpoint_dir(run_dir)
    return None if path is None else Checkpoint(path)


def read_latest_state(run_dir: str | os.PathLike) -> dict | None:
    """The ``state.json`` of the newest checkpoint of ``run_dir`` (``None``: no checkpoint yet),
    without loading its tensors."""
    path = latest_checkpoint_dir(run_dir)
    if path is None:
        return None
    state_file = path / "state.json"
    try:
        return json.loads(state_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"--resume: checkpoint state {state_file} is unreadable ({exc})") from None

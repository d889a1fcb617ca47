"""The backend registry: which implementation of an op runs a given call.

Backends, by preference under ``auto``: ``cuda`` (the compiled extension
``ptpeft_kernels._C``), ``triton`` (on CUDA tensors; on CPU tensors only when
``TRITON_INTERPRET=1`` and asked for explicitly — ``auto`` never picks a backend other
than ``torch`` for CPU tensors) and ``torch`` (pure PyTorch, runs
everywhere). A backend is chosen per call from ``backend=``; when that is ``auto`` (the default) or
``None``, the ``PTPEFT_BACKEND`` environment variable decides if it is set.

Each op module registers its implementations with :func:`register`; the ``triton``
and ``cuda`` implementations live in modules that are imported lazily, the first time
a call could use them, so importing the package never needs Triton, the extension or
a GPU. An implementation may come with a ``supports`` check that returns ``None`` when
it can run the call, or a sentence saying why not. ``auto`` walks the preference order
and takes the first backend that can run the call, logging each reason once at debug
level; an explicitly requested backend that cannot run raises :class:`BackendUnavailableError`.

The first-use guard (:mod:`ptpeft_kernels.verify`) sits where the ops' implementations run:
each op's forward and backward ask :func:`guarded` for the backend to use, which is the
resolved one unless the guard found that backend's kernel wrong for the case on this device.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "register",
    "resolve",
    "get_impl",
    "guarded",
    "has_impl",
]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "cuda", "triton", "torch")
_AUTO_ORDER = ("cuda", "triton", "torch")
ENV_VAR = "PTPEFT_BACKEND"

# Modules that register the implementations of a backend; imported on first need.
_LAZY_MODULES: dict[str, tuple[str, ...]] = {
    "triton": ("ptpeft_kernels.ops.triton_impl",),
    "cuda": ("ptpeft_kernels.ops.cuda",),
}


class BackendUnavailableError(ValueError):
    """An explicitly requested backend cannot run this call on this machine."""


@dataclass(frozen=True)
class _Impl:
    fn: Callable[..., Any]
    supports: Callable[..., str | None] | None


_REGISTRY: dict[str, dict[str, dict[str, _Impl]]] = {}
_loaded: set[str] = set()
_logged_reasons: set[tuple[str, str, str]] = set()


def register(
    op: str, backend: str, kind: str = "forward", supports: Callable[..., str | None] | None = None
) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` as the ``kind`` ("forward", "backward", ...) of ``op`` on ``backend``."""
    if backend not in _AUTO_ORDER:
        raise ValueError(f"backend must be one of {_AUTO_ORDER}, got {backend!r}")

    def wrap(fn: Callable) -> Callable:
        _REGISTRY.setdefault(op, {}).setdefault(backend, {})[kind] = _Impl(fn, supports)
        return fn

    return wrap


def _machine_reason(backend: str) -> str | None:
    """Why ``backend`` cannot run on this machine at all (``None`` if it can)."""
    if backend == "torch":
        return None
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1":
            return "no CUDA device (set TRITON_INTERPRET=1 to run Triton kernels on the CPU, slowly)"
        return None
    if backend == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device"
        # Listed only once the extension has actually loaded (a stale or mismatched build is a reason).
        from .ops.cuda._library import load_reason

        return load_reason()
    raise AssertionError(backend)


def available_backends() -> list[str]:
    """The concrete backends this machine can run, in ``auto``'s order of preference."""
    return [b for b in _AUTO_ORDER if _machine_reason(b) is None]


def _load(backend: str) -> None:
    if backend in _loaded:
        return
    _loaded.add(backend)
    for name in _LAZY_MODULES.get(backend, ()):
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)


def requested_backend(backend: str | None) -> str:
    """Validate ``backend``; ``auto`` (or ``None``) defers to ``PTPEFT_BACKEND`` when that is set.

    A concrete backend passed by the caller wins over the environment, so the variable
    pins every call that did not choose, layers and integrations included.
    """
    if backend is not None and (not isinstance(backend, str) or backend not in BACKENDS):
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend in (None, "auto"):
        env = os.environ.get(ENV_VAR, "").strip()
        if env:
            if env not in BACKENDS:
                raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {env!r}")
            return env
        return "auto"
    return backend


def _call_reason(op: str, backend: str, args: tuple, kwargs: dict) -> str | None:
    reason = _machine_reason(backend)
    if reason is not None:
        return reason
    _load(backend)
    impl = _REGISTRY.get(op, {}).get(backend, {}).get("forward")
    if impl is None:
        return f"the {backend} backend has no implementation of {op}"
    return impl.supports(*args, **kwargs) if impl.supports is not None else None


def _first_tensor_device(args: tuple, kwargs: dict) -> str | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device.type
    return None


def resolve(op: str, backend: str | None, *args: Any, **kwargs: Any) -> str:
    """The concrete backend that runs ``op`` on these arguments.

    ``args``/``kwargs`` are passed to each candidate's ``supports`` check.
    """
    backend = requested_backend(backend)
    if backend != "auto":
        reason = _call_reason(op, backend, args, kwargs)
        if reason is not None:
            raise BackendUnavailableError(f"backend={backend!r} cannot run {op} here: {reason}")
        return backend
    on_cuda = _first_tensor_device(args, kwargs) == "cuda"
    for candidate in _AUTO_ORDER:
        if candidate != "torch" and not on_cuda:
            # Triton runs CPU tensors only in its slow interpreter: a testing tool, never an automatic choice.
            reason = "the tensors are not on a CUDA device"
        else:
            reason = _call_reason(op, candidate, args, kwargs)
        if reason is None:
            return candidate
        key = (op, candidate, reason)
        if key not in _logged_reasons:
            _logged_reasons.add(key)
            logger.debug("%s: auto skips the %s backend: %s", op, candidate, reason)
    raise AssertionError("the torch backend always runs")  # pragma: no cover


def get_impl(op: str, backend: str, kind: str = "forward") -> Callable[..., Any]:
    """The registered ``kind`` implementation of ``op`` on a concrete ``backend``."""
    _load(backend)
    try:
        return _REGISTRY[op][backend][kind].fn
    except KeyError:
        raise BackendUnavailableError(f"the {backend} backend has no {kind} implementation of {op}") from None


def has_impl(op: str, backend: str, kind: str = "forward") -> bool:
    """Whether ``backend`` registers a ``kind`` implementation of ``op``."""
    _load(backend)
    return kind in _REGISTRY.get(op, {}).get(backend, {})


def guarded(op: str, backend: str, *args: Any, kind: str = "forward") -> str:
    """``backend``, or ``"torch"`` where the first-use guard found its kernel wrong for this case here.

    ``args``: the op's forward arguments as its backends receive them; ``kind``: the call about to
    run. Costs a dictionary lookup once the case is checked; see :mod:`ptpeft_kernels.verify`.
    """
    if backend == "torch":
        return backend
    from . import verify

    return verify.route(op, backend, args, kind)

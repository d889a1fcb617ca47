"""Comparison helpers: every output and gradient is checked against a float64 reference.

float32 / float64: ``|actual - ref64| <= atol + rtol * |ref64|`` elementwise.
bfloat16 / float16 (DESIGN.md): the error against float64 may be at most ``factor`` times
the error of the same-dtype PyTorch reference (2x forward, 3x gradients), plus a floor of
a few units in the last place of the largest reference value, so an exactly-representable
case does not demand an exact answer.
"""

from __future__ import annotations

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)
FWD_FACTOR, GRAD_FACTOR = 2.0, 3.0

# (dtype, atol, rtol) for parametrize; low-precision entries use the error-ratio rule instead.
DTYPE_TOLS = [
    (torch.float32, 2e-5, 2e-5),
    (torch.bfloat16, None, None),
]


def assert_close(
    name: str,
    actual: torch.Tensor,
    ref64: torch.Tensor,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    ref_lowp: torch.Tensor | None = None,
    factor: float = FWD_FACTOR,
) -> None:
    """Check ``actual`` against the float64 ``ref64`` with the rule for ``actual.dtype``."""
    assert actual.shape == ref64.shape, f"{name}: shape {tuple(actual.shape)} != ref {tuple(ref64.shape)}"
    actual64 = actual.detach().double()
    assert torch.isfinite(actual64).all(), f"{name}: non-finite values"
    if actual.numel() == 0:
        return
    err = (actual64 - ref64).abs()
    if actual.dtype in LOW_PRECISION:
        assert ref_lowp is not None, f"{name}: low precision needs the same-dtype reference"
        base = (ref_lowp.detach().double() - ref64).abs().max().item()
        floor = 4 * torch.finfo(actual.dtype).eps * ref64.abs().max().item()
        bound = factor * base + floor
        assert err.max().item() <= bound, (
            f"{name}: max error {err.max().item():.3e} vs float64 exceeds {factor}x the same-dtype "
            f"reference's {base:.3e} (+ floor {floor:.1e})"
        )
    else:
        atol = 1e-12 if atol is None and actual.dtype == torch.float64 else atol
        rtol = 1e-10 if rtol is None and actual.dtype == torch.float64 else rtol
        bound = atol + rtol * ref64.abs()
        worst = (err - bound).argmax()
        assert (err <= bound).all(), (
            f"{name}: max error {err.max().item():.3e}; worst element {actual64.flatten()[worst].item():.6g} "
            f"vs reference {ref64.flatten()[worst].item():.6g} (atol {atol}, rtol {rtol})"
        )


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """A non-contiguous tensor with ``t``'s values (a strided view into a larger buffer)."""
    big = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    view = big[..., ::2]
    view.copy_(t.detach())
    assert not view.is_contiguous() or t.numel() <= 1
    return view.requires_grad_(t.requires_grad)


def leaf(t: torch.Tensor, requires_grad: bool = True) -> torch.Tensor:
    return t.detach().clone().requires_grad_(requires_grad)


def grads(out: torch.Tensor, inputs: list[torch.Tensor], grad_out: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, inputs, grad_out, allow_unused=False))


CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"  # where the Triton tests run (the CPU means the interpreter)


def triton_marks() -> list:
    """``pytestmark`` of the Triton test files: marked ``triton``, skipped where it cannot run."""
    import pytest

    import ptpeft_kernels as pk

    return [
        pytest.mark.triton,
        pytest.mark.skipif(
            "triton" not in pk.available_backends(), reason="needs triton (a GPU or the interpreter)"
        ),
    ]

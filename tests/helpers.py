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


# ----------------------------------------------------------------------- references from first principles
#
# Written from DESIGN.md's definitions alone: nothing here calls ptpeft_kernels (checked by
# tests/test_reference_independence.py), so a bug in a mask or activation helper that the library
# shares between its own reference and an implementation cannot hide behind both.


def attention_visibility(
    b: int, hq: int, n: int, m: int, *, causal: bool, attn_mask: torch.Tensor | None
) -> torch.Tensor:
    """Bool (B, Hq, N, M): whether query i of head h in sample b sees sequence key j.

    ``causal`` is bottom-right aligned: i sees j iff j <= i + (M - N). ``attn_mask`` (True = attend)
    is a key-padding (B, M) mask or (B, 1 or Hq, 1 or N, M).
    """
    query = torch.arange(n).view(n, 1)
    key = torch.arange(m).view(1, m)
    visible = torch.ones(b, hq, n, m, dtype=torch.bool)
    if causal:
        visible &= (key - query <= m - n).expand(b, hq, n, m)
    if attn_mask is not None:
        mask = attn_mask.detach().cpu()
        if mask.dim() == 2:
            assert tuple(mask.shape) == (b, m), f"a key-padding mask is (B, M) = {(b, m)}, got {mask.shape}"
            mask = mask.view(b, 1, 1, m)
        mb, mh, mn, mm = mask.shape
        assert mb == b and mh in (1, hq) and mn in (1, n) and mm == m, f"mask {tuple(mask.shape)}"
        visible &= mask.expand(b, hq, n, m)
    return visible


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor | None = None,
    prefix_v: torch.Tensor | None = None,
    *,
    attn_mask: torch.Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Prefix attention by its definition, on the CPU, computed in ``dtype``; returns (B, Hq, N, D) in it.

    Query head h reads key/value head h // (Hq // Hkv); every query sees every prefix key; the
    sequence keys are masked by :func:`attention_visibility`; a row that sees nothing is zero.
    Differentiable: with float64 leaves it gives the float64 reference gradients, with the
    kernel's dtype the "same-dtype PyTorch" error yardstick of the low-precision rule.
    """
    b, hq, n, d = q.shape
    hkv, m = k.shape[1], k.shape[2]
    group = hq // hkv
    kv_head = torch.tensor([h // group for h in range(hq)])
    scale = d**-0.5 if scale is None else scale
    keys, values = k.cpu().to(dtype)[:, kv_head], v.cpu().to(dtype)[:, kv_head]  # (B, Hq, M, D)
    visible = attention_visibility(b, hq, n, m, causal=causal, attn_mask=attn_mask)
    if prefix_k is not None:
        pk_, pv_ = prefix_k.cpu().to(dtype), prefix_v.cpu().to(dtype)
        if pk_.dim() == 3:  # shared by the batch
            pk_, pv_ = pk_.unsqueeze(0).expand(b, -1, -1, -1), pv_.unsqueeze(0).expand(b, -1, -1, -1)
        keys = torch.cat([pk_[:, kv_head], keys], dim=2)
        values = torch.cat([pv_[:, kv_head], values], dim=2)
        seen = torch.ones(b, hq, n, pk_.shape[2], dtype=torch.bool)
        visible = torch.cat([seen, visible], dim=-1)
    scores = (q.cpu().to(dtype) @ keys.transpose(-1, -2)) * scale
    top = scores.masked_fill(~visible, float("-inf")).amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weights = torch.where(visible, torch.exp(scores - top), torch.zeros_like(scores))
    total = weights.sum(dim=-1, keepdim=True)
    probs = weights / torch.where(total > 0, total, torch.ones_like(total))
    return probs @ values


def activation_reference(h: torch.Tensor, name: str) -> torch.Tensor:
    """The adapter activations from their formulas (use float64 ``h``)."""
    if name == "gelu":  # x * Phi(x)
        return h * 0.5 * (1.0 + torch.erf(h / 2.0**0.5))
    if name == "gelu_tanh":
        return 0.5 * h * (1.0 + torch.tanh((2.0 / torch.pi) ** 0.5 * (h + 0.044715 * h * h * h)))
    if name == "relu":
        return h.clamp_min(0.0)
    if name == "silu":  # x * sigmoid(x)
        return h / (1.0 + torch.exp(-h))
    raise ValueError(f"unknown activation {name!r}")

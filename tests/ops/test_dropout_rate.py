"""LoRA dropout keeps each input element with probability 1 - p, on both backends.

Each element of the keep-mask is a Bernoulli(1 - p) draw, so over n elements the kept share has
standard deviation sqrt(p (1 - p) / n); a correct mask lands within 4 of them of 1 - p except
with probability 6e-5 per check (and the seeds are fixed, so a pass is repeatable). The old
check, 45-75 % kept at p = 0.4, let a rate off by 0.15 through.
"""

import math

import pytest
import torch

import ptpeft_kernels as pk
from ptpeft_kernels import backends
from tests.helpers import CUDA, DEVICE, triton_marks

OP = "lora_linear"


def assert_keep_rate(keep: torch.Tensor, p: float, what: str) -> None:
    n = keep.numel()
    bound = 4 * math.sqrt(p * (1 - p) / n)
    share = keep.double().mean().item()
    assert abs(share - (1 - p)) <= bound, (
        f"{what}: kept {share:.5f} of {n} elements at p={p}; expected {1 - p} +- {bound:.5f} (4 sigma)"
    )


@pytest.mark.parametrize("p", [0.1, 0.4, 0.75])
def test_torch_mask_keep_rate_is_binomial_at_a_million_elements(p):
    """Mutation it guards against: the torch mask drawn at 0.9 p (``torch.rand(...) >= p`` ->
    ``>= 0.9 * p`` in ``dropout_mask``): at p = 0.4, 64 % kept instead of 60 %."""
    mask_fn = backends.get_impl(OP, "torch", "dropout_mask")
    keep = mask_fn((1000, 1000), p, 1234 + int(100 * p), torch.device("cpu"))
    assert keep.dtype == torch.bool and keep.shape == (1000, 1000)
    assert_keep_rate(keep, p, "torch dropout_mask")


def test_public_op_drops_at_the_requested_rate():
    """Through ``pk.lora_linear`` itself: with x = 1, W = 0, A = B = I and scaling 1 the output is
    the kept mask scaled by 1 / (1 - p), element by element (2^20 of them)."""
    p, width = 0.4, 64
    x = torch.ones(16384, width, dtype=torch.float64)
    eye = torch.eye(width, dtype=torch.float64)
    torch.manual_seed(5)
    y = pk.lora_linear(x, torch.zeros(width, width, dtype=torch.float64), None, eye, eye, 1.0, dropout_p=p,
                       backend="torch")  # fmt: skip
    scaled = y * (1 - p)
    keep = scaled > 0.5
    torch.testing.assert_close(scaled, keep.double(), rtol=0, atol=1e-12)  # exactly 0 or 1 / (1 - p)
    assert_keep_rate(keep, p, "lora_linear(backend='torch')")


@pytest.mark.parametrize("p", [pytest.param(0.4, marks=triton_marks())])
def test_triton_mask_keep_rate_is_binomial(p):
    """Mutation it guards against: the kernels' mask drawn at 0.9 p (``tl.uint_to_uniform_float(r0) >=
    p`` -> ``>= p * 0.9`` in ``triton_impl/_common.dropout_keep``, which the forward, the backward
    and ``dropout_mask`` all use). Under the interpreter a 256 x 256 mask (65,536 elements, bound
    +-0.0077 at p = 0.4, 1.8 s) is what fits the time budget; a GPU checks 10^6 elements."""
    mask_fn = backends.get_impl(OP, "triton", "dropout_mask")
    shape = (1000, 1000) if CUDA else (256, 256)
    keep = mask_fn(shape, p, 4321, torch.device(DEVICE))
    assert keep.dtype == torch.bool and tuple(keep.shape) == shape
    assert_keep_rate(keep.cpu(), p, "triton dropout_mask")

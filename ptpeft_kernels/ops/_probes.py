"""The first-use guard's probes (see :mod:`ptpeft_kernels.verify`): per op, what a *case* is and
how to check a backend's kernel for one, at a small shape, against the float64 reference.

A case is what selects a different kernel variant or code path for the same op: dtype, the
head-dim (or rank) bucket the kernel pads to, decode (N <= 16) or prefill, causal, mask and
prefix kind, GQA; for the GEMM ops rank bucket, bias, dropout, activation, residual. The
probe keeps the call's head dim / rank, flags and memory layout and shrinks the other sizes,
keeping each one's divisibility by 16 so Triton mostly reuses the call's compiled
specialisation. Each check reports (name, relative error, bound): the error of the kernel
against float64, relative to the reference's largest magnitude, and the bound
``FACTOR x`` the torch backend's own error in the same dtype, or the dtype's floor if larger.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import backends

# Twice the test suite's factors (2x forward, 3x gradients against the same-dtype reference):
# the guard must not cry wolf over a correct kernel, and a wrong one is off by far more.
FACTOR = {"forward": 4.0, "backward": 6.0}
# Relative floors. float32: the tests' elementwise 2e-5, loosened for sums of a few hundred
# terms in another order; low precision: 4 units in the last place, the tests' floor.
FLOOR = {torch.float32: 1e-4, torch.float16: 4 * 2.0**-10, torch.bfloat16: 4 * 2.0**-7}
DECODE_MAX_N = 16  # the query length up to which attention takes its decode path

Check = tuple[str, float, float]


@dataclass(frozen=True)
class ProbeSpec:
    case: Callable[..., tuple]  # forward args -> the case key
    needs_grad: Callable[..., bool]  # forward args -> whether a backward will follow
    probe: Callable[[str, tuple, bool], list[Check]]  # (backend, forward args, check backward)


# ----------------------------------------------------------------------------- helpers


def _bucket(n: int) -> int:
    """The power of two (>= 16) a kernel pads a head dim or rank to."""
    return max(16, 1 << max(0, n - 1).bit_length())


def _small(n: int, cap: int) -> int:
    """``n`` if it is at most ``cap``; else a size near ``cap`` that is a multiple of 16 iff ``n`` is."""
    if n <= cap:
        return n
    base = max(16, cap // 16 * 16)
    return base if n % 16 == 0 else base + 5


def _any_grad(*args) -> bool:
    return any(isinstance(a, Tensor) and a.requires_grad for a in args)


class _Maker:
    """Random probe tensors from one fixed CPU generator (the caller's RNG state is never touched)."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.gen = torch.Generator().manual_seed(20241124)
        self.device, self.dtype = device, dtype

    def randn(self, *shape: int, like: Tensor | None = None, std: float = 1.0) -> Tensor:
        """Normal values of ``shape`` laid out in memory in the order of ``like``'s strides."""
        order = list(range(len(shape)))
        if like is not None and like.dim() == len(shape):
            order.sort(key=lambda i: -like.stride(i))
        dense = torch.randn([shape[i] for i in order], generator=self.gen) * std
        inverse = sorted(range(len(order)), key=order.__getitem__)
        return dense.to(self.device, self.dtype).permute(inverse)

    def mask(self, *shape: int) -> Tensor:
        return (torch.rand(shape, generator=self.gen) < 0.75).to(self.device)


def _rel_err(actual: Tensor, ref64: Tensor) -> float:
    """max |actual - ref| / max |ref| (NaN when ``actual`` is not finite: fails every bound)."""
    if actual.numel() == 0:
        return 0.0
    a = actual.detach().double()
    if not torch.isfinite(a).all():
        return float("nan")
    scale = ref64.abs().max().item()
    return (a - ref64).abs().max().item() / max(scale, 1e-30)


def _bound(kind: str, torch_same: Tensor, ref64: Tensor, dtype: torch.dtype) -> float:
    return max(FACTOR[kind] * _rel_err(torch_same, ref64), FLOOR[dtype])


def _compare(
    kind: str, names: list[str], ours: list, torch_same: list, ref64: list, dtype: torch.dtype
) -> list[Check]:
    """(name, kernel error, bound) for every output whose reference exists (None: not computed)."""
    return [
        (name, _rel_err(a, r), _bound(kind, t, r, dtype))
        for name, a, t, r in zip(names, ours, torch_same, ref64, strict=True)
        if r is not None
    ]


def _ref_grads(fn: Callable[[list[Tensor]], Tensor], inputs: list[Tensor | None], dout: Tensor):
    """Output and gradients of ``fn`` in float64 for the tensors of ``inputs`` (None stays None)."""
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    out = fn(leaves)
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, present, dout.double()))
    return out.detach(), [None if t is None else next(grads) for t in leaves]


# ----------------------------------------------------------------------------- prefix_attention


def _attention_case(q, k, v, prefix_k, prefix_v, attn_mask, causal, scale) -> tuple:
    if attn_mask is None:
        mask = "no-mask"
    elif attn_mask.dim() == 2:
        mask = "padding-mask"
    else:
        mask = f"mask-h{'1' if attn_mask.shape[1] == 1 else 'q'}-n{'1' if attn_mask.shape[2] == 1 else 'n'}"
    prefix = "no-prefix" if prefix_k is None else ("shared-prefix" if prefix_k.dim() == 3 else "batch-prefix")
    return (
        str(q.dtype).replace("torch.", ""),
        f"D<={_bucket(q.shape[-1])}",
        "decode" if q.shape[2] <= DECODE_MAX_N else "prefill",
        "causal" if causal else "non-causal",
        mask,
        prefix,
        "gqa" if q.shape[1] != k.shape[1] else "mha",
    )


def _attention_inputs(call: tuple) -> tuple:
    q, k, v, prefix_k, prefix_v, attn_mask, causal, scale = call
    hq, n, d = q.shape[1:]
    hkv, m = k.shape[1], k.shape[2]
    make = _Maker(q.device, q.dtype)
    b, kv_heads = 2, min(hkv, 2)
    heads = kv_heads * min(hq // hkv, 8)
    if n <= DECODE_MAX_N:
        n_p = n
        m_p = _small(m, 300) if not causal else max(n_p, _small(m, 300))
    else:
        n_p = _small(n, 80)
        m_p = n_p + _small(m - n, 24) if causal else _small(m, 96)
    pq = make.randn(b, heads, n_p, d, like=q)
    pk_, pv_ = make.randn(b, kv_heads, m_p, d, like=k), make.randn(b, kv_heads, m_p, d, like=v)
    ppk = ppv = None
    if prefix_k is not None:
        p = _small(prefix_k.shape[-2], 20)
        lead = (kv_heads,) if prefix_k.dim() == 3 else (b, kv_heads)
        ppk, ppv = make.randn(*lead, p, d, like=prefix_k), make.randn(*lead, p, d, like=prefix_v)
    mask = None
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            mask = make.mask(b, m_p)
        else:
            mask = make.mask(
                b, 1 if attn_mask.shape[1] == 1 else heads, 1 if attn_mask.shape[2] == 1 else n_p, m_p
            )
    return pq, pk_, pv_, ppk, ppv, mask, causal, scale


def _attention_probe(backend: str, call: tuple, backward: bool) -> list[Check]:
    from .prefix_attention import OP, prefix_attention_ref

    q, k, v, pk_, pv_, mask, causal, scale = _attention_inputs(call)
    args = (q, k, v, pk_, pv_, mask, causal, scale)
    out, lse = backends.get_impl(OP, backend)(*args)
    t_out, t_lse = backends.get_impl(OP, "torch")(*args)
    dout = _Maker(q.device, q.dtype).randn(*q.shape)

    def ref(ts):
        return prefix_attention_ref(*ts, attn_mask=mask, causal=causal, scale=scale)

    ref_out, ref_grads = _ref_grads(ref, [q, k, v, pk_, pv_], dout)
    checks = _compare("forward", ["output"], [out], [t_out], [ref_out], q.dtype)
    if backward:
        grads = backends.get_impl(OP, backend, "backward")(dout, *args[:6], out, lse, causal, scale)
        t_grads = backends.get_impl(OP, "torch", "backward")(dout, *args[:6], t_out, t_lse, causal, scale)
        names = ["dq", "dk", "dv", "dprefix_k", "dprefix_v"]
        checks += _compare("backward", names, list(grads), list(t_grads), ref_grads, q.dtype)
    return checks


# ----------------------------------------------------------------------------- lora_linear


def _lora_case(x, weight, bias, lora_A, lora_B, scaling, dropout_p) -> tuple:
    return (
        str(x.dtype).replace("torch.", ""),
        f"r<={_bucket(lora_A.shape[0])}",
        "bias" if bias is not None else "no-bias",
        "dropout" if dropout_p > 0.0 else "no-dropout",
    )


def _lora_probe(backend: str, call: tuple, backward: bool) -> list[Check]:
    from .lora import OP, lora_linear_ref

    x, weight, bias, lora_A, lora_B, scaling, dropout_p = call
    out_f, in_f = weight.shape
    rank, tokens = lora_A.shape[0], max(1, x.numel() // max(1, x.shape[-1]))
    make = _Maker(x.device, x.dtype)
    fin, fout, t = _small(in_f, 96), _small(out_f, 80), _small(tokens, 48)
    px = make.randn(t, fin)
    pw = make.randn(fout, fin, like=weight, std=fin**-0.5)
    pb = None if bias is None else make.randn(fout)
    pa, pbb = make.randn(rank, fin, std=fin**-0.5), make.randn(fout, rank, std=rank**-0.5)
    seed = 1234
    y, h = backends.get_impl(OP, backend)(px, pw, pb, pa, pbb, scaling, dropout_p, seed)
    keep = None
    if dropout_p > 0.0:
        keep = backends.get_impl(OP, backend, "dropout_mask")(px.shape, dropout_p, seed, px.device)
    # The torch yardstick runs without dropout: its mask differs; it only measures dtype rounding.
    t_y, t_h = backends.get_impl(OP, "torch")(px, pw, pb, pa, pbb, scaling, 0.0, 0)
    dy = make.randn(t, fout)

    def ref(ts, keep=keep, p=dropout_p):
        return lora_linear_ref(ts[0], ts[1], ts[2], ts[3], ts[4], scaling, dropout_keep=keep, dropout_p=p)

    inputs = [px, pw, pb, pa, pbb]
    ref_y, ref_grads = _ref_grads(ref, inputs, dy)
    ref_y0, ref_grads0 = _ref_grads(lambda ts: ref(ts, None, 0.0), inputs, dy)
    # Bounds from the torch backend's error at p = 0, applied to the kernel's error at the call's p.
    checks = [("output", _rel_err(y, ref_y), _bound("forward", t_y, ref_y0, x.dtype))]
    if backward:
        needs = [True, True, pb is not None, True, True]
        grads = backends.get_impl(OP, backend, "backward")(dy, *inputs, h, scaling, dropout_p, seed, needs)
        t_grads = backends.get_impl(OP, "torch", "backward")(dy, *inputs, t_h, scaling, 0.0, 0, needs)
        names = ["dx", "dweight", "dbias", "dlora_A", "dlora_B"]
        for name, g, t_g, r, r0 in zip(names, grads, t_grads, ref_grads, ref_grads0, strict=True):
            if r is not None:
                checks.append((name, _rel_err(g, r), _bound("backward", t_g, r0, x.dtype)))
    return checks


# ----------------------------------------------------------------------------- adapter


def _adapter_case(x, down_weight, down_bias, up_weight, up_bias, activation, scaling, residual) -> tuple:
    return (
        str(x.dtype).replace("torch.", ""),
        f"r<={_bucket(down_weight.shape[0])}",
        activation,
        "down-bias" if down_bias is not None else "no-down-bias",
        "up-bias" if up_bias is not None else "no-up-bias",
        "residual" if residual is not None else "x-residual",
    )


def _adapter_probe(backend: str, call: tuple, backward: bool) -> list[Check]:
    from .adapter import OP, adapter_ref

    x, down_weight, down_bias, up_weight, up_bias, activation, scaling, residual = call
    rank, d_in = down_weight.shape
    d_out = up_weight.shape[0]
    make = _Maker(x.device, x.dtype)
    fin = _small(d_in, 96)
    fout = fin if residual is None else _small(d_out, 80)
    t = _small(max(1, x.numel() // max(1, d_in)), 48)
    px = make.randn(t, fin)
    pdw, pdb = make.randn(rank, fin, std=fin**-0.5), None if down_bias is None else make.randn(rank)
    puw, pub = make.randn(fout, rank, std=rank**-0.5), None if up_bias is None else make.randn(fout)
    pres = None if residual is None else make.randn(t, fout)
    args = (px, pdw, pdb, puw, pub, activation, scaling, pres)
    y, h = backends.get_impl(OP, backend)(*args)
    t_y, t_h = backends.get_impl(OP, "torch")(*args)
    dy = make.randn(t, fout)

    def ref(ts):
        return adapter_ref(*ts, activation=activation, scaling=scaling, residual=pres)

    ref_y, ref_grads = _ref_grads(ref, [px, pdw, pdb, puw, pub], dy)
    checks = _compare("forward", ["output"], [y], [t_y], [ref_y], x.dtype)
    if backward:
        needs = [True, True, pdb is not None, True, pub is not None]
        tail = (activation, scaling, pres is not None, needs)
        grads = backends.get_impl(OP, backend, "backward")(dy, px, pdw, pdb, puw, pub, h, *tail)
        t_grads = backends.get_impl(OP, "torch", "backward")(dy, px, pdw, pdb, puw, pub, t_h, *tail)
        names = ["dx", "ddown_weight", "ddown_bias", "dup_weight", "dup_bias"]
        checks += _compare("backward", names, list(grads), list(t_grads), ref_grads, x.dtype)
    return checks


PROBES: dict[str, ProbeSpec] = {
    "prefix_attention": ProbeSpec(_attention_case, lambda *a: _any_grad(*a), _attention_probe),
    "lora_linear": ProbeSpec(_lora_case, lambda *a: _any_grad(*a), _lora_probe),
    "adapter": ProbeSpec(_adapter_case, lambda *a: _any_grad(*a), _adapter_probe),
}


# ----------------------------------------------------------------------------- standard cases


def standard_calls(device: torch.device, smoke: bool = False) -> Iterator[tuple[str, tuple]]:
    """Sample forward calls, one per standard case, most valuable first (the benchmarked bf16 ones).

    Only their metadata matters (the probe makes its own tensors); ``smoke``: tiny head dims and
    float32 only, for the CPU interpreter. Decode cases carry a long cache, so the probe's
    (shrunk) one still spans several key blocks.
    """

    def t(*shape, dtype=torch.float32):
        return torch.empty(shape, dtype=dtype, device=device)

    def attention(dtype, d, n):
        m = n + 8 if n > DECODE_MAX_N or smoke else 4096
        q, kv = t(2, 4, n, d, dtype=dtype), t(2, 4 if n > DECODE_MAX_N else 2, m, d, dtype=dtype)
        prefix = t(kv.shape[1], 7 if smoke else 32, d, dtype=dtype)
        mask = t(2, m, dtype=torch.bool) if n <= DECODE_MAX_N else None
        return "prefix_attention", (q, kv, kv, prefix, prefix, mask, True, d**-0.5)

    def gemms(dtype):
        width, rank = (32, 4) if smoke else (4096, 16)
        x, w = t(8, width, dtype=dtype), t(width, width, dtype=dtype)
        yield "lora_linear", (x, w, None, t(rank, width, dtype=dtype), t(width, rank, dtype=dtype), 2.0, 0.0)
        down, up = t(4 * rank, width, dtype=dtype), t(width, 4 * rank, dtype=dtype)
        yield "adapter", (x, down, t(4 * rank, dtype=dtype), up, t(width, dtype=dtype), "gelu", 1.0, None)

    if smoke:  # one attention and one GEMM case: the interpreter is slow
        yield attention(torch.float32, 16, 1)
        yield from list(gemms(torch.float32))[1:]
        return
    bf16 = torch.bfloat16
    yield attention(bf16, 128, 2048)
    yield attention(bf16, 128, 1)
    yield from gemms(bf16)
    fp16, fp32 = torch.float16, torch.float32
    for dtype, d, n in [(bf16, 64, 2048), (bf16, 80, 2048), (fp16, 128, 2048), (fp32, 64, 2048),
                        (fp32, 128, 2048), (fp32, 128, 1)]:  # fmt: skip
        yield attention(dtype, d, n)
    yield from gemms(torch.float32)

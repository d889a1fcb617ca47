"""cuda backend of ``prefix_attention``: split-KV decode attention (csrc/prefix_attention/).

Serves decode and short-query calls — N <= 16 queries, head dims 64/80/96/128, float16 or
bfloat16, no gradient — over the prefix (shared ``(Hkv, P, D)``, read in place with batch
stride 0, or per batch) and the KV cache ``(B, Hkv, M, D)``, bottom-right causal, with an
optional bool mask (key padding ``(B, M)`` or ``(B, 1|Hq, 1|N, M)``). Anything else falls
through to the triton / torch backends via :func:`supports`. Returns the output and the
natural-log LSE (float32, -inf for rows that see no key) like the other backends.
"""

from __future__ import annotations

import torch

from ... import backends
from ..prefix_attention import OP
from ._common import device_reason, dtype_reason, empty_reason, grad_reason

DTYPES = (torch.float16, torch.bfloat16)
HEAD_DIMS = (64, 80, 96, 128)
MAX_QUERIES = 16  # beyond, prefill: the Triton / torch flash kernels use tensor cores for Q·K


def supports(q, k, v, prefix_k, prefix_v, attn_mask, causal, scale) -> str | None:
    reason = device_reason(q, k, v, prefix_k, prefix_v, attn_mask) or dtype_reason(q.dtype, DTYPES)
    if reason is None and q.shape[2] > MAX_QUERIES:
        reason = f"the cuda backend serves decode calls (N <= {MAX_QUERIES} queries), got N={q.shape[2]}"
    if reason is None and q.shape[3] not in HEAD_DIMS:
        reason = f"the cuda backend supports head dims {HEAD_DIMS}, got {q.shape[3]}"
    if reason is None:
        reason = empty_reason(q, k) or grad_reason(q, k, v, prefix_k, prefix_v)
    if reason is None:
        for name, t in (("q", q), ("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v)):
            if t is not None and t.stride(-1) != 1:
                reason = f"{name} has a strided head dim (stride {t.stride(-1)}); the cuda kernel reads rows"
                break
    return reason


@backends.register(OP, "cuda", supports=supports)
def forward(q, k, v, prefix_k, prefix_v, attn_mask, causal, scale, num_splits: int = 0):
    b, hq, n, _ = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq, n), dtype=torch.float32, device=q.device)
    torch.ops.ptpeft_cuda.decode_attention(
        q, k, v, prefix_k, prefix_v, attn_mask, causal, float(scale), num_splits, out, lse
    )
    return out, lse

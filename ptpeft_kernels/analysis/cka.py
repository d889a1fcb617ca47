"""Linear centred kernel alignment (CKA) between two sets of features of the same inputs.

For column-centred X (n x d1) and Y (n x d2):

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F * ||Y^T Y||_F)

in [0, 1]; 1 for X = Y, unchanged by isotropic scaling and orthogonal transforms of either side
(not by arbitrary invertible linear maps). Rows are paired: row t of X and row t of Y must come
from the same token of the same input.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .spectrum import as_sample_list


def _token_matrix(name: str, features: object) -> tuple[torch.Tensor, list[int] | None]:
    """(n, d) float64 matrix of all tokens, plus per-sample lengths when given per sample."""
    if isinstance(features, torch.Tensor) and features.dim() == 2:
        if not features.is_floating_point():
            raise TypeError(f"{name} must have a real floating dtype, got {features.dtype}")
        if not torch.isfinite(features).all():
            raise ValueError(f"{name} contains NaN or inf values")
        return features.detach().to(device="cpu", dtype=torch.float64), None
    samples = as_sample_list(features, name)
    lengths = [s.shape[0] for s in samples]
    mat = torch.cat([s.detach().to(device="cpu", dtype=torch.float64) for s in samples])
    return mat, lengths


def cka(base: torch.Tensor | Sequence[torch.Tensor], adapted: torch.Tensor | Sequence[torch.Tensor]) -> float:
    """Linear CKA between ``base`` and ``adapted`` features, computed in float64.

    Args:
        base, adapted: each an (n, d) matrix (rows = tokens or samples), a list of per-sample
            (L_i, d) tensors, or an (S, L, d) tensor; per-sample forms are concatenated over
            tokens. Both must describe the same n rows in the same order (per-sample lengths
            must agree); the widths d1, d2 may differ.

    Returns:
        A float in [0, 1].
    """
    x, x_len = _token_matrix("base", base)
    y, y_len = _token_matrix("adapted", adapted)
    if x_len is not None and y_len is not None and x_len != y_len:
        if len(x_len) != len(y_len):
            detail = f"{len(x_len)} vs {len(y_len)} samples"
        else:
            i = next(i for i, (a, b) in enumerate(zip(x_len, y_len, strict=True)) if a != b)
            detail = f"sample {i} has {x_len[i]} vs {y_len[i]} rows"
        raise ValueError(
            f"base and adapted per-sample lengths differ ({detail}); CKA pairs rows of the same tokens"
        )
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"base has {x.shape[0]} rows but adapted has {y.shape[0]}; CKA pairs rows")
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"CKA needs at least 2 rows to centre, got {n}")
    x = x - x.mean(dim=0, keepdim=True)
    y = y - y.mean(dim=0, keepdim=True)
    if x.abs().max() == 0 or y.abs().max() == 0:
        which = "base" if x.abs().max() == 0 else "adapted"
        raise ValueError(f"{which} features are constant across rows; CKA is undefined")
    # Same value either way; pick the cheaper Gram: feature space (d x d) when n is large,
    # sample space (n x n, doubly centred through the column-centred X) when n < d.
    if n >= max(x.shape[1], y.shape[1]):
        cross = (y.T @ x).square().sum()
        norm_x = torch.linalg.matrix_norm(x.T @ x)
        norm_y = torch.linalg.matrix_norm(y.T @ y)
    else:
        kx = x @ x.T
        ky = y @ y.T
        cross = (kx * ky).sum()
        norm_x = torch.linalg.matrix_norm(kx)
        norm_y = torch.linalg.matrix_norm(ky)
    value = float(cross / (norm_x * norm_y))
    # Round-off can push CKA(x, x) a few ulps past 1.
    return min(max(value, 0.0), 1.0)

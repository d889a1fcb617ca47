"""``PrefixEncoder``: every layer's key/value prefixes, reparameterised through a small MLP or flat."""

from __future__ import annotations

import torch
from torch import nn

from ._validate import check_int


class PrefixEncoder(nn.Module):
    """Produces the (K, V) prefixes of ``num_layers`` attention layers.

    With ``reparam_hidden`` set (the prefix-tuning paper's reparameterisation), prefixes
    are ``Linear(tanh(Linear(Embedding(P))))``: an embedding of the P prefix positions
    (width ``embed_dim``, default ``num_kv_heads * head_dim``), a hidden layer of width
    ``reparam_hidden``, and an output of ``num_layers * 2 * num_kv_heads * head_dim`` per
    position. With ``reparam_hidden=None`` the prefixes are one flat parameter.
    :meth:`fold` turns the first form into the second (same outputs, no MLP at inference).

    ``forward()`` returns a tensor (num_layers, 2, num_kv_heads, P, head_dim); index
    ``[layer, 0]`` for keys and ``[layer, 1]`` for values, the (Hkv, P, D) shape
    ``prefix_attention`` takes.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_prefix: int,
        reparam_hidden: int | None = 512,
        embed_dim: int | None = None,
        init_std: float = 0.02,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_layers = check_int("num_layers", num_layers, low=1)
        self.num_kv_heads = check_int("num_kv_heads", num_kv_heads, low=1)
        self.head_dim = check_int("head_dim", head_dim, low=1)
        self.num_prefix = check_int("num_prefix", num_prefix, low=0)
        kwargs = {"device": device, "dtype": dtype}
        out_width = num_layers * 2 * num_kv_heads * head_dim
        if reparam_hidden is None:
            self.embedding = self.mlp = None
            flat = torch.randn(num_layers, 2, num_kv_heads, num_prefix, head_dim, **kwargs) * init_std
            self.prefix = nn.Parameter(flat)
        else:
            check_int("reparam_hidden", reparam_hidden, low=1)
            embed_dim = check_int("embed_dim", embed_dim or num_kv_heads * head_dim, low=1)
            self.embedding = nn.Embedding(num_prefix, embed_dim, **kwargs)
            self.mlp = nn.Sequential(
                nn.Linear(embed_dim, reparam_hidden, **kwargs),
                nn.Tanh(),
                nn.Linear(reparam_hidden, out_width, **kwargs),
            )
            self.prefix = None

    @property
    def reparameterized(self) -> bool:
        return self.mlp is not None

    @property
    def reparam_hidden(self) -> int | None:
        """Hidden width of the reparameterisation MLP (None for a flat or folded encoder)."""
        return None if self.mlp is None else self.mlp[0].out_features

    @property
    def embed_dim(self) -> int | None:
        """Width of the prefix-position embedding (None for a flat or folded encoder)."""
        return None if self.embedding is None else self.embedding.embedding_dim

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``index``'s (key, value) prefixes, each (Hkv, P, D), equal to ``forward()[index]``.

        Only that layer's rows of the output projection are computed, so calling this per
        layer as the layer runs (which keeps gradient checkpointing's recomputation exact)
        costs one tanh(embedding) MLP hidden state per call, not the whole output.
        """
        if not -self.num_layers <= index < self.num_layers:
            raise IndexError(f"layer index {index} out of range for {self.num_layers} layers")
        index %= self.num_layers
        if self.mlp is None:
            return self.prefix[index, 0], self.prefix[index, 1]
        first, last = self.mlp[0], self.mlp[2]
        hidden = torch.tanh(first(self.embedding.weight))  # (P, hidden)
        width = 2 * self.num_kv_heads * self.head_dim
        rows = slice(index * width, (index + 1) * width)
        flat = nn.functional.linear(hidden, last.weight[rows], None if last.bias is None else last.bias[rows])
        both = flat.view(self.num_prefix, 2, self.num_kv_heads, self.head_dim).permute(1, 2, 0, 3)
        return both[0], both[1]

    def forward(self) -> torch.Tensor:
        if self.mlp is None:
            return self.prefix
        flat = self.mlp(self.embedding.weight)  # (P, L * 2 * Hkv * D)
        flat = flat.view(self.num_prefix, self.num_layers, 2, self.num_kv_heads, self.head_dim)
        return flat.permute(1, 2, 3, 0, 4)  # (L, 2, Hkv, P, D)

    @torch.no_grad()
    def fold(self) -> PrefixEncoder:
        """Replace the MLP by its output (a flat, still trainable parameter); returns ``self``."""
        if self.mlp is not None:
            self.prefix = nn.Parameter(self.forward().contiguous().clone())
            self.embedding = self.mlp = None
        return self

    def extra_repr(self) -> str:
        return (
            f"num_layers={self.num_layers}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"num_prefix={self.num_prefix}, reparameterized={self.reparameterized}"
        )

"""Multi-head self-attention over :func:`fastclip.ops.attention`, with open_clip's parameter layout.

``MultiheadSelfAttention`` holds exactly the parameters of ``torch.nn.MultiheadAttention`` (as
open_clip's ``ResidualAttentionBlock.attn`` uses it): ``in_proj_weight`` [3E, E], ``in_proj_bias``
[3E], ``out_proj`` (Linear E -> E), so an open_clip state dict loads unchanged.  The q/k/v heads are
strided views of the fused projection (no copy); the attention backend is picked per call by the
dispatcher from static properties (device, dtype, head dim, causal), which is plain Python that
``torch.compile(fullgraph=True)`` folds to a constant.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.attention import attention

__all__ = ["MultiheadSelfAttention"]


class MultiheadSelfAttention(nn.Module):
    """Self-attention ``x [B, L, E] -> [B, L, E]`` (batch first), no dropout.

    Args:
        embed_dim: E.  num_heads: H (E must be divisible by H; head_dim = E // H).
        causal: every call is causal (the text tower's fast path, no mask tensor needed).
        backend: attention backend ("auto", "flash_attn", "triton", "xformers", "sdpa", "reference").
        bias: add in/out projection biases (open_clip: True).

    ``forward(x, attn_mask=None)``: ``attn_mask`` is an optional [L, L] (or broadcastable to
    [B, H, L, L]) mask in ``nn.MultiheadAttention``'s convention: additive float (open_clip's
    text tower passes a float mask with -inf above the diagonal) or bool where **True = masked
    out**.  A mask forces the sdpa backend; ``causal=True`` (with or without a mask) keeps the fast
    kernels when no other mask is given.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, causal: bool = False, backend: str = "auto",
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        for name, val in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim must be divisible by num_heads, got embed_dim={embed_dim} and "
                             f"num_heads={num_heads}")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.causal = bool(causal)
        self.backend = backend
        self.batch_first = True
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.MultiheadAttention's initialisation (out_proj keeps nn.Linear's default weight init).
        nn.init.xavier_uniform_(self.in_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, causal={self.causal}, backend={self.backend!r}"

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be [B, L, embed_dim={self.embed_dim}], got shape {tuple(x.shape)}")
        B, L, E = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)           # [B, L, 3E]
        qkv = qkv.unflatten(-1, (3, self.num_heads, self.head_dim))          # [B, L, 3, H, hd]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                       # 3 x [B, H, L, hd] views
        mask = None
        if attn_mask is not None:
            # nn.MultiheadAttention convention (bool True = masked) -> SDPA's (True = may attend).
            mask = ~attn_mask if attn_mask.dtype == torch.bool else attn_mask.to(q.dtype)
        out = attention(q, k, v, causal=self.causal, attn_mask=mask, backend=self.backend)
        out = out.transpose(1, 2).reshape(B, L, E)
        return self.out_proj(out)

"""``PatchMasking``: FLIP/CLIPA token dropping as a module (over :func:`fastclip.ops.patch_mask`)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops.patch_mask import MODES, check_mask_ratio, patch_mask

__all__ = ["PatchMasking"]


class PatchMasking(nn.Module):
    """Keep a ``1 - mask_ratio`` share of the patch tokens while training; identity otherwise.

    Place it after the position embedding and before the transformer blocks.  Works inside
    ``torch.compile(fullgraph=True)`` with ``generator=None`` (the global RNG; note that inductor
    draws its own random numbers unless ``torch._inductor.config.fallback_random`` is set).

    Args:
        mask_ratio: in [0, 1); settable on a live model (``model.visual.patch_mask.mask_ratio = 0.5``,
            e.g. for FLIP's unmasked tuning at the end), validated on every assignment.
        mode: "random", "grid" or "block" (see :mod:`fastclip.ops.patch_mask`).
        num_prefix_tokens: leading tokens always kept (class token).
        grid_size: (gh, gw) of the patch grid; required for "grid" and "block".
        backend: gather backend of ``patch_mask``.

    ``forward(x [B, P + N, C], generator=None, return_ids=False)`` returns x_kept [B, P + K, C]
    (and ids_keep [B, K] if ``return_ids``).  In eval mode or at ratio 0 it returns x unchanged
    (ids_keep = arange(N)).
    """

    def __init__(self, mask_ratio: float = 0.0, mode: str = "random", num_prefix_tokens: int = 1,
                 grid_size: Optional[tuple] = None, *, backend: str = "auto"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode != "random" and grid_size is None:
            raise ValueError(f"grid_size=(gh, gw) is required for mode={mode!r}, got None")
        if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be an int >= 0, got {num_prefix_tokens!r}")
        self.mask_ratio = mask_ratio
        self.mode = mode
        self.num_prefix_tokens = num_prefix_tokens
        self.grid_size = None if grid_size is None else tuple(grid_size)
        self.backend = backend

    @property
    def mask_ratio(self) -> float:
        return self._mask_ratio

    @mask_ratio.setter
    def mask_ratio(self, value) -> None:
        self._mask_ratio = check_mask_ratio(value, "mask_ratio")
        # Read back in forward through float(str): a string cannot become symbolic, so when the
        # ratio changes on a compiled model torch.compile recompiles for the new constant instead of
        # tracing a symbolic float (the block/grid layout needs concrete integers).
        self._mask_ratio_key = repr(self._mask_ratio)

    def extra_repr(self) -> str:
        grid = f", grid_size={self.grid_size}" if self.grid_size else ""
        return f"mask_ratio={self.mask_ratio}, mode={self.mode!r}, num_prefix_tokens={self.num_prefix_tokens}{grid}"

    def forward(self, x: torch.Tensor, generator: Optional[torch.Generator] = None, return_ids: bool = False):
        ratio = float(self._mask_ratio_key)
        if not self.training or ratio == 0.0:
            if not return_ids:
                return x
            n = x.shape[1] - self.num_prefix_tokens
            return x, torch.arange(n, device=x.device).expand(x.shape[0], n)
        x_kept, ids = patch_mask(x, ratio, mode=self.mode, num_prefix_tokens=self.num_prefix_tokens,
                                 grid_size=self.grid_size, generator=generator, backend=self.backend)
        return (x_kept, ids) if return_ids else x_kept

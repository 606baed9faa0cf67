"""The image-token grid of a transformer call, read from its inputs (no globals: each
call may have another resolution)."""
from __future__ import annotations

import torch


def sd3_grid(transformer, hidden_states: torch.Tensor) -> tuple[int, int]:
    """SD3 patchifies (B, C, H, W) latents row-major into (H/p)·(W/p) tokens."""
    patch = transformer.config.patch_size
    return hidden_states.shape[-2] // patch, hidden_states.shape[-1] // patch


def flux_grid(img_ids: torch.Tensor | None, image_tokens: int) -> tuple[tuple[int, int] | None, str]:
    """(rows, cols) from FLUX's image position ids, or (None, why) when they are not a
    full row-major grid (e.g. Kontext's reference tokens appended to the image)."""
    if img_ids is None:
        return None, "the call has no img_ids"
    ids = img_ids[0] if img_ids.ndim == 3 else img_ids
    if ids.shape[0] != image_tokens:
        return None, f"{ids.shape[0]} image ids for {image_tokens} image tokens"
    y, x = ids[:, 1].round().long(), ids[:, 2].round().long()
    y, x = y - y.min(), x - x.min()
    rows, cols = int(y.max()) + 1, int(x.max()) + 1
    if rows * cols != image_tokens:
        return None, f"image ids span {rows}×{cols} cells for {image_tokens} tokens"
    expected_y = torch.arange(rows, device=y.device).repeat_interleave(cols)
    expected_x = torch.arange(cols, device=x.device).repeat(rows)
    if not (torch.equal(y, expected_y) and torch.equal(x, expected_x)):
        return None, "image ids are not in row-major order"
    return (rows, cols), ""

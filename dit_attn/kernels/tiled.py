"""CLEAR local attention on the CPU without any S×S work.

Image queries are grouped in 2-D tiles; each tile attends to its halo of image keys (a
rectangle cut from the zero-padded key grid, with the exact circle and the grid border
masked) and to the global keys (text, and pooled image keys with down-sampling). The
two key sets share one softmax: a common row maximum, one normaliser. Text queries
attend densely to the text and image keys with torch SDPA. One tile row is computed at
a time, so temporaries are O(tile row · (halo + global keys)).

Video windows (`LocalWindow3D`) group the queries in 3-D tiles; the tiles of one band (same
frames and rows) share one gather of their key rows, and each tile attends to a contiguous
window of them.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F

from . import masks
from .plan import AttentionPlan
from .sdpa import blend, sdpa_attention, text_segments
from .window import (LocalWindow, LocalWindow3D, TileGeometry, VideoTileGeometry, default_tile, default_tile_3d, pool_grid,
                     tile_geometry, video_tile_geometry)


def _tile_row_queries(q_grid: torch.Tensor, geo: TileGeometry, tile_row: int) -> torch.Tensor:
    """(B, H, rows_p, cols_p, D) padded queries → (B, H, tile cols, tile cells, D)."""
    tile_rows, tile_cols = geo.tile
    band = q_grid[:, :, tile_row * tile_rows : (tile_row + 1) * tile_rows]
    band = band.unflatten(3, (-1, tile_cols))  # (B, H, tile_rows, tile cols, tile_cols, D)
    return band.permute(0, 1, 3, 2, 4, 5).flatten(3, 4)


def _tile_row_halos(x_padded: torch.Tensor, geo: TileGeometry, tile_row: int) -> torch.Tensor:
    """(B, H, rows_p + 2·reach, cols_p + 2·reach, D) → (B, H, tile cols, halo cells, D)."""
    tile_rows, tile_cols = geo.tile
    halo_rows, halo_cols = geo.halo
    band = x_padded[:, :, tile_row * tile_rows : tile_row * tile_rows + halo_rows]
    halos = band.unfold(3, halo_cols, tile_cols)  # (B, H, halo_rows, tile cols, D, halo_cols)
    return halos.permute(0, 1, 3, 2, 5, 4).flatten(3, 4)


def _untile_row(out: torch.Tensor, geo: TileGeometry) -> torch.Tensor:
    """(B, H, tile cols, tile cells, D) → (B, H, tile_rows, cols_p, D)."""
    tile_rows, tile_cols = geo.tile
    out = out.unflatten(3, (tile_rows, tile_cols)).permute(0, 1, 3, 2, 4, 5)
    return out.flatten(3, 4)


def _softmax_two_sets(local_logits, global_logits, v_local, v_global, in_place: bool) -> torch.Tensor:
    """Softmax over the union of two key sets, then the value average: never concatenated."""
    top = local_logits.amax(dim=-1, keepdim=True)
    if global_logits is not None:
        top = torch.maximum(top, global_logits.amax(dim=-1, keepdim=True))
    if in_place:
        weights_local = local_logits.sub_(top).exp_()
    else:
        weights_local = (local_logits - top).exp()
    total = weights_local.sum(dim=-1, keepdim=True)
    out = weights_local @ v_local
    if global_logits is not None:
        weights_global = global_logits.sub_(top).exp_() if in_place else (global_logits - top).exp()
        total = total + weights_global.sum(dim=-1, keepdim=True)
        out = out + weights_global @ v_global
    return out / total


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _flash_with_lse():
    """torch's fused CPU attention that also returns the log-normaliser (None if this torch lacks it)."""
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def local_image_attention(q_img, k_img, v_img, k_global, v_global, window: LocalWindow, scale: float,
                          tile: tuple[int, int] | None = None, global_bias: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, N_img, D) image queries → (B, H, N_img, D), local circle + global keys.

    Inference on the CPU uses torch's fused attention kernel per tile row and merges the
    local and global parts by their log-normalisers; with gradients, the same math runs
    as plain tensor ops (the fused kernel's log-normaliser has no gradient). global_bias
    (B|1, H|1, 1, G): a bias of the global keys shared by every image query (a pipeline's key mask).
    """
    rows, cols = window.grid
    geo = tile_geometry(window.grid, float(window.radius), tile or default_tile(window.radius))
    n_tile_rows, n_tile_cols = geo.tiles
    r = geo.reach
    pad_rows, pad_cols = n_tile_rows * geo.tile[0] - rows, n_tile_cols * geo.tile[1] - cols

    def grid_of(x):
        return x.unflatten(2, (rows, cols))

    q_grid = F.pad(grid_of(q_img), (0, 0, 0, pad_cols, 0, pad_rows))
    k_padded = F.pad(grid_of(k_img), (0, 0, r, r + pad_cols, r, r + pad_rows))
    v_padded = F.pad(grid_of(v_img), (0, 0, r, r + pad_cols, r, r + pad_rows))
    fused = _flash_with_lse()
    if fused is not None and not q_img.is_cuda and not _needs_grad(q_img, k_img, v_img, k_global, v_global):
        out = _fused_bands(fused, q_grid, k_padded, v_padded, k_global, v_global, geo, scale, global_bias)
    else:
        out = _exact_bands(q_grid, k_padded, v_padded, k_global, v_global, geo, scale, global_bias)
    return out[:, :, :rows, :cols].flatten(2, 3)


def _exact_bands(q_grid, k_padded, v_padded, k_global, v_global, geo: TileGeometry, scale: float,
                 global_bias=None) -> torch.Tensor:
    in_place = not _needs_grad(q_grid, k_padded, v_padded, k_global, v_global)
    blocked = torch.finfo(q_grid.dtype).min
    bands = []
    for tile_row in range(geo.tiles[0]):
        q_tiles = _tile_row_queries(q_grid, geo, tile_row) * scale
        k_halo = _tile_row_halos(k_padded, geo, tile_row)
        v_halo = _tile_row_halos(v_padded, geo, tile_row)
        local_logits = q_tiles @ k_halo.transpose(-1, -2)
        allowed = geo.allowed(tile_row).to(local_logits.device)
        if in_place:
            local_logits.masked_fill_(~allowed, blocked)
        else:
            local_logits = local_logits.masked_fill(~allowed, blocked)
        global_logits = None
        if k_global is not None:
            global_logits = q_tiles @ k_global.unsqueeze(2).transpose(-1, -2)
            if global_bias is not None:
                global_logits = global_logits + global_bias.unsqueeze(2)
        v_glob = v_global.unsqueeze(2) if v_global is not None else None
        out = _softmax_two_sets(local_logits, global_logits, v_halo, v_glob, in_place)
        bands.append(_untile_row(out, geo))
    return torch.cat(bands, dim=2)


def _fused_bands(fused, q_grid, k_padded, v_padded, k_global, v_global, geo: TileGeometry, scale: float,
                 global_bias=None) -> torch.Tensor:
    batch, heads, dim = q_grid.shape[0], q_grid.shape[1], q_grid.shape[-1]
    n_tile_cols = geo.tiles[1]
    blocked = torch.finfo(q_grid.dtype).min

    def tiles_as_batch(x):  # (B, H, tiles, n, D) → (B·tiles, H, n, D)
        return x.transpose(1, 2).reshape(batch * n_tile_cols, heads, x.shape[-2], x.shape[-1])

    outs, lses = [], []
    for tile_row in range(geo.tiles[0]):
        allowed = geo.allowed(tile_row)
        bias = torch.zeros(allowed.shape, dtype=q_grid.dtype).masked_fill_(~allowed, blocked)
        bias = bias.to(q_grid.device).unsqueeze(1).repeat(batch, 1, 1, 1)  # (B·tiles, 1, cells, halo)
        out, lse = fused(tiles_as_batch(_tile_row_queries(q_grid, geo, tile_row)),
                         tiles_as_batch(_tile_row_halos(k_padded, geo, tile_row)),
                         tiles_as_batch(_tile_row_halos(v_padded, geo, tile_row)), attn_mask=bias, scale=scale)
        outs.append(_untile_row(out.view(batch, n_tile_cols, heads, -1, dim).transpose(1, 2), geo))
        lses.append(_untile_row(lse.view(batch, n_tile_cols, heads, -1, 1).transpose(1, 2), geo))
    out, lse = torch.cat(outs, dim=2), torch.cat(lses, dim=2)
    if k_global is None:
        return out
    padded = q_grid.shape[2:4]
    q_flat = q_grid.flatten(2, 3)
    mask = None
    if global_bias is not None:
        mask = global_bias.to(q_flat.dtype).expand(batch, global_bias.shape[1], q_flat.shape[2], -1)
    out_g, lse_g = fused(q_flat, k_global, v_global, attn_mask=mask, scale=scale)
    out_g, lse_g = out_g.unflatten(2, padded), lse_g.unflatten(2, padded).unsqueeze(-1)
    top = torch.maximum(lse, lse_g)
    weight, weight_g = (lse - top).exp_(), (lse_g - top).exp_()
    return out.mul_(weight).add_(out_g.mul_(weight_g)).div_(weight.add_(weight_g))


def _video_untile(x: torch.Tensor, geo: VideoTileGeometry) -> torch.Tensor:
    """(B, tiles, tile cells, H, D), tiles in (frame, row, col) order → (B, N, H, D), the padding cut off."""
    (nt, ny, nx), (tt, ty, tx) = geo.tiles, geo.tile
    x = x.reshape(x.shape[0], nt, ny, nx, tt, ty, tx, *x.shape[-2:]).permute(0, 1, 4, 2, 5, 3, 6, 7, 8)
    x = x.reshape(x.shape[0], *geo.padded, *x.shape[-2:])
    frames, rows, cols = geo.grid
    return x[:, :frames, :rows, :cols].flatten(1, 3)


def video_image_attention(q_img, k_img, v_img, k_global, v_global, window: LocalWindow3D, scale: float,
                          tile: tuple[int, int, int] | None = None, global_bias: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, N, D) video queries → (B, H, N, D): each 3-D tile against its halo keys plus the global keys.

    One band of tiles at a time: its key rows are gathered once, column-major, and each tile's halo is a
    window of them (a strided view for torch's fused CPU kernel, whose log-normalisers merge the global
    keys; with gradients, a copy and plain tensor ops, as `local_image_attention`).
    """
    geo = video_tile_geometry(window.grid, window.radius, tile or default_tile_3d(window.radius), window.shape)
    batch, heads, _, dim = q_img.shape
    (n_frame_tiles, n_row_tiles, n_col_tiles), (tile_frames, tile_rows, tile_cols) = geo.tiles, geo.tile
    query_pad = [p - n for p, n in zip(geo.padded, geo.grid)]

    def padded_grid(x, low):  # (B, H, N, D) → (B, F', Y', X', H, D), zero-padded by `low` plus the query padding
        pad = [0, 0, 0, 0]
        for before, extra in reversed(list(zip(low, query_pad))):
            pad += [before, before + extra]
        return F.pad(x.transpose(1, 2).unflatten(1, geo.grid), pad)

    def column_major(x):  # → (B, X_k, F_k·Y_k, H, D)
        return padded_grid(x, geo.reach).flatten(1, 2).transpose(1, 2).contiguous()

    q_grid = padded_grid(q_img, (0, 0, 0))
    k_cols, v_cols = column_major(k_img), column_major(v_img)
    n_rows, width = len(geo.rows), geo.window
    device, blocked = q_img.device, torch.finfo(q_img.dtype).min
    keep_cols = (geo.allowed.view(1, -1, width, n_rows).to(device)
                 & geo.cols_inside().to(device)[:, None, :, None]).flatten(2)  # (col tiles, cells, width · rows)
    fused = _flash_with_lse()
    use_fused = fused is not None and not q_img.is_cuda and not _needs_grad(q_img, k_img, v_img, k_global, v_global)
    in_place = not _needs_grad(q_img, k_img, v_img, k_global, v_global)
    bias_cols = torch.zeros(keep_cols.shape, dtype=q_img.dtype, device=device).masked_fill_(~keep_cols, blocked).unsqueeze(1)
    bias_of_rows: dict[tuple[bool, ...], torch.Tensor] = {}  # bands at the same distance from the borders share one bias
    outs, lses = [], []
    for frame_tile in range(n_frame_tiles):
        for row_tile in range(n_row_tiles):
            rows, rows_inside = geo.band_rows(frame_tile, row_tile)
            rows_outside = ~torch.tensor(rows_inside, device=device).repeat(width)  # keys in (column, row) order
            q_band = q_grid[:, frame_tile * tile_frames:(frame_tile + 1) * tile_frames,
                            row_tile * tile_rows:(row_tile + 1) * tile_rows]
            q_band = q_band.unflatten(3, (n_col_tiles, tile_cols)).permute(0, 3, 1, 2, 4, 5, 6).flatten(2, 4)
            rows = torch.tensor(rows, device=device)
            k_band, v_band = (x.index_select(2, rows) for x in (k_cols, v_cols))  # (B, X_k, rows, H, D)
            if use_fused:
                if rows_inside not in bias_of_rows:
                    bias_of_rows[rows_inside] = bias_cols.masked_fill(rows_outside, blocked)
                bias = bias_of_rows[rows_inside]
                halo_shape = (n_col_tiles, width * n_rows, heads, dim)
                halo_stride = (tile_cols * n_rows * heads * dim, heads * dim, dim, 1)
                band_out, band_lse = [], []
                for row in range(batch):
                    k_halo, v_halo = (x[row].as_strided(halo_shape, halo_stride).transpose(1, 2) for x in (k_band, v_band))
                    out, lse = fused(q_band[row].transpose(1, 2), k_halo, v_halo, attn_mask=bias, scale=scale)
                    band_out.append(out.transpose(1, 2))
                    band_lse.append(lse.transpose(1, 2).unsqueeze(-1))
                outs.append(torch.stack(band_out))
                lses.append(torch.stack(band_lse))
            else:
                def halos(x):  # (B, X_k, rows, H, D) → (B, H, col tiles, width · rows, D), a copy
                    return x.unfold(1, width, tile_cols).permute(0, 3, 1, 5, 2, 4).flatten(3, 4)
                q_heads = q_band.permute(0, 3, 1, 2, 4) * scale  # (B, H, col tiles, cells, D)
                keep = keep_cols & ~rows_outside
                local_logits = (q_heads @ halos(k_band).transpose(-1, -2)).masked_fill(~keep, blocked)
                global_logits, v_glob = None, None
                if k_global is not None:
                    global_logits = q_heads @ k_global.unsqueeze(2).transpose(-1, -2)
                    if global_bias is not None:
                        global_logits = global_logits + global_bias.unsqueeze(2)
                    v_glob = v_global.unsqueeze(2)
                out = _softmax_two_sets(local_logits, global_logits, halos(v_band), v_glob, in_place)
                outs.append(out.permute(0, 2, 3, 1, 4))
    out = _video_untile(torch.cat(outs, dim=1), geo).transpose(1, 2)
    if not use_fused or k_global is None:
        return out
    lse = _video_untile(torch.cat(lses, dim=1), geo).transpose(1, 2)
    mask = None
    if global_bias is not None:
        mask = global_bias.to(q_img.dtype).expand(batch, global_bias.shape[1], q_img.shape[2], -1)
    out_g, lse_g = fused(q_img, k_global, v_global, attn_mask=mask, scale=scale)
    lse_g = lse_g.unsqueeze(-1)
    top = torch.maximum(lse, lse_g)
    weight, weight_g = (lse - top).exp_(), (lse_g - top).exp_()
    return out.mul(weight).add_(out_g.mul_(weight_g)).div_(weight.add_(weight_g))


def global_keys(k, v, image: slice, window: LocalWindow) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Text keys/values plus, with down-sampling, the pooled image keys/values."""
    parts_k = [k[:, :, s] for s in text_segments(k.shape[-2], image)]
    parts_v = [v[:, :, s] for s in text_segments(v.shape[-2], image)]
    if window.pool:
        parts_k.append(pool_grid(k[:, :, image], window.grid, window.pool, window.pool_weight))
        parts_v.append(pool_grid(v[:, :, image], window.grid, window.pool, window.pool_weight))
    if not parts_k:
        return None, None
    if len(parts_k) == 1:
        return parts_k[0], parts_v[0]
    return torch.cat(parts_k, dim=2), torch.cat(parts_v, dim=2)


def global_key_bias(attn_mask: torch.Tensor, image: slice, seq_len: int, window: LocalWindow, dtype) -> torch.Tensor:
    """The pipeline mask's bias of the global keys (text, then pooled), relative to the image keys."""
    text = masks.text_key_bias(masks.additive(attn_mask, torch.float32), image, text_segments(seq_len, image))
    bias = F.pad(text, (0, window.pooled_tokens))
    return bias.clamp(min=torch.finfo(dtype).min).to(dtype)  # fully masked sets stay finite in the merge


def tiled_attention(q, k, v, plan: AttentionPlan, scale: float | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, S, D) → (B, H, S, D): the plan's local window, then its perturbations; attn_mask:
    a pipeline's key mask (4-D, the same for every image query, see `masks`)."""
    window = plan.window
    scale_value = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    image = plan.image_slice(q.shape[-2])
    window.check_tokens(image)
    if window.covers_grid():  # every key is in every circle: stock attention
        return sdpa_attention(q, k, v, replace(plan, window=None), scale, attn_mask)
    k_global, v_global = global_keys(k, v, image, window)
    bias = None
    if attn_mask is not None and k_global is not None:
        bias = global_key_bias(attn_mask, image, q.shape[-2], window, torch.float64 if q.dtype == torch.float64 else torch.float32)
    elif attn_mask is not None:
        masks.image_query_bias(masks.additive(attn_mask, torch.float32), image)  # raises on masks among image keys
    attend = video_image_attention if isinstance(window, LocalWindow3D) else local_image_attention
    image_out = attend(q[:, :, image], k[:, :, image], v[:, :, image], k_global, v_global, window,
                                      scale_value, global_bias=bias)
    parts = []
    for segment in (slice(0, image.start), image, slice(image.stop, q.shape[-2])):
        if segment is image:
            parts.append(image_out.to(q.dtype))
        elif segment.stop > segment.start:
            parts.append(F.scaled_dot_product_attention(q[:, :, segment], k, v, attn_mask=masks.queries(attn_mask, segment),
                                                        scale=scale))
    out = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
    for p in plan.perturbations:
        blend(out, q, k, v, p, image, scale_value, attn_mask)
    return out

"""`Capture` on video calls (Wan): maps on the (frames, height, width) grid of each call's video tokens.

cross: the cross-attention `attn2`'s own softmax over its text keys (the pipeline's padded T5 tokens, with
TextPatch's source keys where it patches), for every video query and the chosen text columns; for
image-to-video, the image context's separate softmax is not part of it. self: the self-attention `attn1`'s
edited map (LocalAttention's 3-D window and SoftPAG in it) of chosen video locations over every video key.
Maps are (rows, layers, heads, tokens, frames, height, width); `overlay_frames` draws them over the frames.
"""
from __future__ import annotations

import math

import torch

from .maps import chunks, edited_columns
from .recorder import CaptureRecorder

# Wan's VAE: latent frame 0 is video frame 0, latent frame j ≥ 1 holds video frames 4j − 3 … 4j
TEMPORAL_FACTOR = 4


class VideoCaptureRecorder(CaptureRecorder):
    """The recorder of a Capture on a video family whose processors hand it attn1's q/k (`record`) and attn2's
    video queries and text keys (`record_cross`)."""

    def __init__(self, pipe, family, edit, layer_map):
        if edit.kind == "concept":
            raise NotImplementedError("Capture(kind='concept') does not run on video models yet: give kind='cross' "
                                      "(text words or token indices) or kind='self' (video locations)")
        super().__init__(pipe, family, edit, layer_map)

    def record(self, layer: int, query, key, plan, attention_mask, image_range, scale, layout, call) -> None:
        """attn1: every token of the call is a video token."""
        if self.edit.kind == "self":
            super().record(layer, query, key, plan, attention_mask, (0, query.shape[1 if layout == "BSHD" else 2]),
                           scale, layout, call)

    def record_cross(self, layer: int, query: torch.Tensor, key: torch.Tensor, call) -> None:
        """attn2 of `layer`: video queries (B, N, H, D) and text keys (B, S, H, D), softmax over the S keys."""
        pending = self._pending
        if self.edit.kind != "cross" or pending is None or layer not in self.layers:
            return
        if call.grid is None or math.prod(call.grid) != query.shape[1]:
            raise ValueError(f"Capture needs the video tokens of each call on a full grid: {call.grid_problem}")
        self._grid = call.grid
        rows = pending.rows.to(query.device)
        heads = torch.tensor(self.heads, device=query.device)
        q = query.transpose(1, 2).index_select(0, rows).index_select(1, heads)
        k = key.transpose(1, 2).index_select(0, rows).index_select(1, heads)
        batch, n_heads, videos, text_len = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        groups = self._text_groups(text_len, rows)
        pieces = []
        with torch.no_grad():
            for positions in chunks(torch.arange(videos, device=q.device), batch, n_heads, text_len):
                p = edited_columns(q, k, positions, torch.arange(text_len, device=q.device), slice(0, 0))
                if isinstance(groups, torch.Tensor):
                    pieces.append(p[..., groups.to(p.device)])
                else:  # words: each word's mass, the sum over its tokens
                    pieces.append(torch.stack([torch.stack([p[r][..., cols].sum(-1) for cols in groups[r]], dim=-1)
                                               for r in range(batch)]))
        out = torch.cat(pieces, dim=2)  # (R, heads, N, T)
        pending.layers[layer] = out.permute(0, 1, 3, 2).reshape(batch, n_heads, -1, *call.grid).float().cpu()


def latent_frame(video_frame: int, latent_frames: int, temporal_factor: int = TEMPORAL_FACTOR) -> int:
    """The latent frame (of `latent_frames`) that holds decoded video frame `video_frame`: latent 0 holds frame 0,
    latent j the `temporal_factor` frames before frame j·temporal_factor + 1."""
    if video_frame < 0:
        raise ValueError(f"video_frame must be >= 0, got {video_frame}")
    return min((video_frame + temporal_factor - 1) // temporal_factor, latent_frames - 1)


def overlay_frames(frames, maps, alpha: float = 0.6, normalize: bool = True,
                   temporal_factor: int = TEMPORAL_FACTOR) -> list:
    """Each decoded frame with its latent frame's map blended over it (`dit_attn.capture.overlay`).

    frames: the video as a list of PIL images (a pipeline's `.frames[0]` with output_type="pil");
    maps: (F, H, W), one map per latent frame (e.g. `result.maps[row, layer, head, token]`);
    temporal_factor: the VAE's temporal compression (`pipe.vae_scale_factor_temporal`; 4 for Wan and HunyuanVideo 1.5).
    """
    from PIL import Image

    from .heatmap import overlay

    values = torch.as_tensor(maps)
    if values.ndim != 3:
        raise ValueError(f"maps must be (frames, H, W) on the video-token grid, got shape {tuple(values.shape)}")
    frames = list(frames)
    if not frames or not all(isinstance(f, Image.Image) for f in frames):
        raise TypeError("frames must be a non-empty list of PIL images (the pipeline's output_type='pil' frames)")
    latent_frames = values.shape[0]
    if not isinstance(temporal_factor, int) or temporal_factor < 1:
        raise ValueError(f"temporal_factor must be a whole number >= 1, got {temporal_factor!r}")
    expected = (latent_frames - 1) * temporal_factor + 1
    if len(frames) != expected:
        raise ValueError(f"{latent_frames} latent frames decode to {expected} video frames, got {len(frames)}")
    return [overlay(frame, values[latent_frame(i, latent_frames, temporal_factor)], alpha, normalize)
            for i, frame in enumerate(frames)]

"""`Capture` on video calls (Wan): maps on the (frames, height, width) grid of each call's video tokens.

cross: the cross-attention `attn2`'s own softmax over its text keys (the pipeline's padded T5 tokens, with
TextPatch's source keys where it patches), for every video query and the chosen text columns; for
image-to-video, the image context's separate softmax is not part of it. self: the self-attention `attn1`'s
edited map (LocalAttention's 3-D window and SoftPAG in it) of chosen video locations over every video key.
concept: attn2's text output of each video query against each concept's mean attn2 value (the text has no
queries in Wan).
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

    def concept_call(self, call: dict):
        """concept: no second call; the maps come from attn2's outputs and the concept text's values
        (`record_cross_output`)."""
        return None

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

    def record_cross_output(self, layer: int, attn, out: torch.Tensor, call) -> None:
        """A concept capture, attn2 of `layer`: `out` (B, N, H·D), the video queries' output over the text keys
        before the output projection. In Wan the text has no queries (it enters only as attn2's keys and
        values), so a concept's vector is the mean of its tokens' attn2 values, in the space of those outputs;
        each map is the softmax over the concepts of (video output · concept value) per head."""
        pending = self._pending
        if self.edit.kind != "concept" or pending is None or layer not in self.layers:
            return
        from ..processors.wan import _text_keys_values

        self._grid = call.grid
        embeds, _ = self.concept_rows.encoded(call.text_len, out.device, out.dtype)
        with torch.no_grad():
            _, values = _text_keys_values(attn, self.family.nag_text_states(self._transformer_of(attn), embeds))
            heads = torch.tensor(self.heads, device=out.device)
            values = values[0].index_select(1, heads).float()  # (S, heads, D)
            concepts = torch.stack([values[cols].mean(0) for cols in self.concept_rows.columns], dim=1)  # (heads, C, D)
            video = out.index_select(0, pending.rows.to(out.device)).unflatten(2, (attn.heads, -1))
            video = video.index_select(2, heads).float().transpose(1, 2)  # (R, heads, N, D)
            scores = torch.softmax(video @ concepts.transpose(-1, -2).unsqueeze(0), dim=-1)  # (R, heads, N, C)
        pending.layers[layer] = scores.transpose(2, 3).reshape(*scores.shape[:2], -1, *call.grid).cpu()

    def _transformer_of(self, attn):
        """The transformer `attn` belongs to (Wan 2.2: either expert; each has its own text embedder)."""
        experts = [t for t in (self.pipe.transformer, getattr(self.pipe, "transformer_2", None)) if t is not None]
        if len(experts) == 1:
            return experts[0]
        owners = getattr(self, "_owners", None)
        if owners is None:
            owners = self._owners = {id(m): t for t in experts for m in t.modules()}
        return owners[id(attn)]


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

"""Z-Image (`ZImageTransformer2DModel`): single-stream blocks `layers.i` → layer i.

The model has no `AttentionMixin`: its processors are reached through each module's
`processor`. Only the main blocks are layers; the noise refiner (image tokens only) and
the context refiner (caption tokens only) run before the joint sequence exists and keep
their stock processors.

A call takes *lists* of per-sample tensors: `x` (C, F, H, W) latents and `cap_feats`
(L_i, D) captions of any length, and returns a list. Each sample's joint sequence is
[image (padded with the model's pad token to a multiple of 32) ; caption (likewise)], and
the rows are zero-padded to the longest one with a bool key mask. All images of a call
have one size, so the image tokens are the same leading range (0, n) of every row.

The model unpatchifies each sample after its blocks, so extra rows are added to the
call's lists (`widen_at_call`). CFG is one call with the conditional rows first
([cond ; negative]); the pipelines negate the stacked prediction before the scheduler
step (`prediction`). Turbo runs with guidance_scale 0: one call of conditional rows.

Text edits (TextPatch, TextGuard, NAG): a source (or negative) prompt is encoded by the pipeline's
own `encode_prompt` at its default `max_sequence_length` and rides as one more entry of the call's
lists with its own caption length (the model pads every row itself); the processor swaps the whole
caption segment of a row, so no alignment of token lengths is needed (see `processors.z_image`).
NAG over layers 0…k instead appends the negative caption segment to every row's sequence in the main
blocks (`hooks.nag_tokens`).
"""
from __future__ import annotations

import torch

from ..heads import LayerInfo, head_dim
from .base import CallRows, Family


def _patch_sizes(call: dict) -> tuple[int, int]:
    # the forward's own defaults when the pipeline does not pass them
    return int(call.get("patch_size") or 2), int(call.get("f_patch_size") or 1)


def _is_omni(call: dict) -> bool:
    x = call.get("x")
    return bool(x) and isinstance(x[0], (list, tuple))


class ZImage(Family):
    name = "z_image"
    transformer_classes = ("ZImageTransformer2DModel",)
    stock_processors = ("ZSingleStreamAttnProcessor",)
    guided_pipelines = ("ZImagePipeline", "ZImageImg2ImgPipeline", "ZImageInpaintPipeline")
    rows = CallRows(
        call_args=("x", "t", "cap_feats"),
        block_stream_args=(),
        block_call_args=(),
        controlnet_args=("controlnet_block_samples",),
    )
    text_first = False
    widen_at_call = True
    rotary = False  # complex rotary tables from `rope_embedder`, not a `pos_embed` with `theta`
    nag = True
    negative_embeds_extra = ""

    # --- layers and processors -------------------------------------------------------------
    def layers(self, transformer) -> list[LayerInfo]:
        return [LayerInfo(i, f"layers.{i}.attention", "single", block.attention.heads, head_dim(block.attention))
                for i, block in enumerate(transformer.layers)]

    def attention_processors(self, transformer) -> dict:
        return {f"layers.{i}.attention.processor": block.attention.processor
                for i, block in enumerate(transformer.layers)}

    def layer_of_key(self, key: str, transformer) -> int:
        block_list, index = key.split(".")[:2]
        if block_list != "layers":
            raise ValueError(f"{key} is not an attention of Z-Image's main blocks")
        return int(index)

    def processor_for(self, key: str, layer: int, state):
        from ..processors.z_image import ZImageAttnProcessor

        return ZImageAttnProcessor(layer, state)

    def fork_points(self, transformer):
        return []  # widened at the call

    # --- one transformer call ----------------------------------------------------------------
    def batch_size(self, call: dict) -> int:
        return len(call["x"])

    def text_length(self, call: dict) -> int:
        captions = call.get("cap_feats")
        if not captions or _is_omni(call):
            return 0
        return int(captions[0].shape[0])

    def image_length(self, call: dict) -> int | None:
        grid, _ = self._token_grid(call)
        if grid is None:
            return None
        frames, rows, cols = grid
        return frames * rows * cols

    def _token_grid(self, call: dict) -> tuple[tuple[int, int, int] | None, str]:
        x = call.get("x")
        if not x:
            return None, "the call has no x"
        if _is_omni(call):
            return None, "an omni call puts the caption and condition images around the generated image"
        patch, f_patch = _patch_sizes(call)
        shapes = {tuple(sample.shape) for sample in x}
        if len(shapes) != 1:
            return None, f"the call's images have different sizes {sorted(shapes)}"
        _, frames, height, width = shapes.pop()
        return (frames // f_patch, height // patch, width // patch), ""

    def grid(self, transformer, call: dict):
        grid, why = self._token_grid(call)
        if grid is None:
            return None, why
        frames, rows, cols = grid
        if frames != 1:
            return None, f"the call has {frames} frames of image tokens; local windows cover one image grid"
        return (rows, cols), ""

    # --- its pipelines -------------------------------------------------------------------------
    def conditional_rows(self, pipe, batch: int, call: dict, context: str | None):
        """With CFG the call is [cond ; negative]; a step the pipeline's `cfg_truncation` leaves without CFG
        (and Turbo's guidance_scale 0) is one call of conditional rows."""
        from ..hooks.private import z_image_cfg_truncation

        cfg = bool(pipe.do_classifier_free_guidance)
        truncation = z_image_cfg_truncation(pipe)
        if cfg and truncation is not None and float(truncation) <= 1:
            cfg = not float(call["t"][0]) > truncation  # the call's t is the pipeline's t_norm
        if not cfg:
            return range(batch)
        if batch % 2:
            raise RuntimeError(f"a Z-Image CFG call with an odd number of rows ({batch})")
        return range(batch // 2)

    def nag_tokens_fit(self, call: dict) -> bool:
        """Not an omni call (its caption leads; the row path refuses it in one line)."""
        return not _is_omni(call)

    def sequence_length_of_call(self, pipe, text_length: int) -> None:
        """None: the pipeline's default; a source prompt keeps its own caption length in the call."""
        return None

    def given_negative(self, nag, text_len: int):
        """Any length: a caption keeps its own length in the call (`encode_prompts`' mask keeps all of it)."""
        return nag.negative_prompt_embeds, self.all_tokens(nag.negative_prompt_embeds)

    def append_text_rows(self, call: dict, embeds, extra, padded: bool = True) -> dict:
        """The source prompts' captions (their `extra` mask's tokens) appended to the call's `cap_feats`."""
        captions = call["cap_feats"]
        lengths = (extra != 0).sum(dim=1).tolist()
        added = [embeds[i, : int(n)].to(captions[0]) for i, n in enumerate(lengths)]
        return {"cap_feats": list(captions) + added}

    def prediction(self, sample):
        """The pipelines stack the output list in float32, drop the frame axis and negate it."""
        if isinstance(sample, torch.Tensor):
            return -sample.float().squeeze(2)
        return -torch.stack([s.float() for s in sample]).squeeze(2)

    def encode_prompts(self, pipe, prompts, max_sequence_length):
        """(caption states (N, S, D) zero-padded to the longest prompt, caption mask (N, S)) from the
        pipeline's own `encode_prompt` (which drops each prompt's padding)."""
        embeds, _ = pipe.encode_prompt(prompt=list(prompts), do_classifier_free_guidance=False,
                                       max_sequence_length=max_sequence_length or 512)
        longest = max(e.shape[0] for e in embeds)
        mask = torch.zeros(len(embeds), longest, dtype=torch.long, device=embeds[0].device)
        padded = embeds[0].new_zeros(len(embeds), longest, embeds[0].shape[-1])
        for i, e in enumerate(embeds):
            padded[i, : e.shape[0]] = e
            mask[i, : e.shape[0]] = 1
        return padded, mask

    # --- training --------------------------------------------------------------------------------
    def max_token_side(self, transformer) -> int | None:
        # rotary tables hold axes_lens positions per axis: (frame, row, col)
        lens = transformer.config.axes_lens
        return int(min(lens[1], lens[2]))

    def latent_patch(self, transformer) -> int:
        return int(transformer.config.all_patch_size[0])

    def predict(self, transformer, x_t, embeds, pooled, t, latent_hw, guidance=1.0):
        """`pooled` is the caption mask from `encode_prompts`; the model's time runs the other way (1 − t) and
        its output is the negated velocity."""
        device, dtype = transformer.device, transformer.dtype
        embeds = embeds.to(device, dtype)
        lengths = (pooled != 0).sum(dim=1).tolist() if pooled is not None else [embeds.shape[1]] * embeds.shape[0]
        captions = [embeds[i, : int(n)] for i, n in enumerate(lengths)]
        latents = list(x_t.to(device, dtype).unsqueeze(2).unbind(0))
        out = transformer(latents, (1 - t).to(device, dtype), captions, return_dict=False)[0]
        return self.prediction(out)

"""HunyuanVideo 1.5 (`HunyuanVideo15Transformer3DModel`): double-stream blocks `transformer_blocks.i` → layer i
(no single-stream blocks); joint sequence [video ; context]; latents (B, C, F, H, W) patchified frame-major by
(`patch_size_t`, `patch_size`, `patch_size`); rotary on the video tokens only.

The context of a call is, per row, the image-context states (SigLIP states for image-to-video; zeros, masked,
for text-to-video), the ByT5 glyph states and the Qwen text states refined by the model's token refiner
(whose attention keeps its stock processor: it is not a layer), each row's tokens reordered by its own
masks as [valid image ; valid ByT5 ; valid Qwen ; padding ...]. The blocks always get that bool mask over
the context, which the processor turns into a query-and-key mask as stock does.

The model unpatchifies with its *input* batch after the blocks, so extra rows are appended to the call's
inputs (`widen_at_call`).

Text edits (TextPatch, TextGuard, NAG) as on HunyuanImage 2.1: a source (or negative) prompt's Qwen states,
ByT5 glyph states and both masks ride as extra rows of the call at the call's padded lengths, with the latents,
timesteps and image embeddings of their target rows; the model refines and reorders each row by its own masks,
and the processors give a target row its source row's whole context segment (keys, values and key mask). The
image-context tokens of image-to-video are part of that segment: the source row carries its target's image
embeddings, so the swapped segment holds the same image (refined alongside the source text instead of the
target's). A prompt changes the text of the context; the conditioning image stays. The context has no rotary
positions, so nothing else needs aligning. NAG over layers 0…k instead appends a negative context to every row's
context in the blocks (`hooks.nag_tokens`): the row's image context and the negative prompt's glyphs and Qwen text,
prepared once per call as the model prepares a row's.

HeadGuidance and CFG: both pipelines run one call per condition of their guider (`ClassifierFreeGuidance`)
under `cache_context("pred_cond")` and `("pred_uncond")` (left stock), conditional first, then take the
guider's combination; HeadGuidance's s·(ε_c − ε_p) is added to that. With guidance scale 1 the guider makes
the single "pred_cond" call a step.
"""
from __future__ import annotations

import torch

from ..heads import LayerInfo, head_dim
from .base import CallRows, Family
from .hunyuan_image import HunyuanImage, packed_text

_CONTEXT_INPUTS = ("encoder_hidden_states", "encoder_hidden_states_2", "image_embeds")


class HunyuanVideo15(Family):
    name = "hunyuan_video15"
    transformer_classes = ("HunyuanVideo15Transformer3DModel",)
    stock_processors = ("HunyuanVideo15AttnProcessor2_0",)
    guided_pipelines = ("HunyuanVideo15Pipeline", "HunyuanVideo15ImageToVideoPipeline")
    rows = CallRows(
        call_args=("hidden_states", "timestep", "encoder_hidden_states", "encoder_attention_mask", "timestep_r",
                   "encoder_hidden_states_2", "encoder_attention_mask_2", "image_embeds"),
        # not forked at blocks (widen_at_call); what would flow / be mapped there:
        block_stream_args=("hidden_states", "encoder_hidden_states"),
        block_call_args=("temb", "attention_mask"),
    )
    text_first = False
    widen_at_call = True
    makes_videos = True
    video_capture = False  # Capture: the joint recorder (cross and self maps from the [video ; context] attention)
    rotary = False  # a `rope` module of (cos, sin) tables, not a `pos_embed` with `theta`
    nag = True
    negative_embeds_extra, negative_mask_required = "glyphs", True  # as HunyuanImage 2.1's

    # --- layers and processors -------------------------------------------------------------
    def layers(self, transformer) -> list[LayerInfo]:
        return [LayerInfo(i, f"transformer_blocks.{i}.attn", "double", block.attn.heads, head_dim(block.attn))
                for i, block in enumerate(transformer.transformer_blocks)]

    def attention_processors(self, transformer) -> dict:
        """The blocks' processors only (the token refiner's attention stays stock)."""
        return {f"transformer_blocks.{i}.attn.processor": block.attn.processor
                for i, block in enumerate(transformer.transformer_blocks)}

    def layer_of_key(self, key: str, transformer) -> int:
        block_list, index = key.split(".")[:2]
        if block_list != "transformer_blocks":
            raise ValueError(f"{key} is not an attention of HunyuanVideo 1.5's blocks")
        return int(index)

    def processor_for(self, key: str, layer: int, state):
        from ..processors.hunyuan_video15 import HunyuanVideo15AttnProcessor

        return HunyuanVideo15AttnProcessor(layer, state)

    def fork_points(self, transformer):
        return []  # widened at the call

    # --- one transformer call ----------------------------------------------------------------
    def text_length(self, call: dict) -> int:
        """Context tokens of the call: Qwen text, ByT5 glyphs and image context (padding included)."""
        return sum(call[name].shape[1] for name in _CONTEXT_INPUTS if call.get(name) is not None)

    def grid(self, transformer, call: dict):
        """(frames, rows, cols) of the call's video tokens."""
        hidden = call.get("hidden_states")
        if hidden is None:
            return None, "the call has no hidden_states"
        frames, height, width = hidden.shape[-3:]
        patch, patch_t = int(transformer.config.patch_size), int(transformer.config.patch_size_t)
        return (frames // patch_t, height // patch, width // patch), ""

    # --- its pipelines -------------------------------------------------------------------------
    def conditional_rows(self, pipe, batch: int, call: dict, context: str | None):
        """The guider's conditional call ("pred_cond", every row); its other calls are left stock."""
        if context not in (None, "pred_cond"):
            return None
        return range(batch)

    def encode_prompts(self, pipe, prompts, max_sequence_length):
        """(Qwen text states (N, S, D), the Qwen mask, the ByT5 glyph mask and the glyph states (S2 × D2)
        flattened as one (N, S + S2 + S2·D2) tensor), from the pipeline's own `encode_prompt` at its padded
        lengths: the packing `append_text_rows` reads."""
        embeds, mask, glyphs, glyph_mask = pipe.encode_prompt(prompt=list(prompts), batch_size=len(prompts),
                                                              num_videos_per_prompt=1)
        return embeds, packed_text(embeds, mask, glyphs, glyph_mask)

    # the same Qwen and ByT5 call inputs as HunyuanImage 2.1's, packed the same way by `encode_prompts`
    append_text_rows = HunyuanImage.append_text_rows
    text_inputs = HunyuanImage.text_inputs
    given_negative = HunyuanImage.given_negative

    def latent_patch(self, transformer) -> int:
        return int(transformer.config.patch_size)

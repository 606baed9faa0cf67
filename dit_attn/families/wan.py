"""Wan 2.1 / 2.2 (`WanTransformer3DModel`): blocks `blocks.i` → layer i, each with a self-attention
`attn1` over the video tokens (the layer dit-attn edits) and a cross-attention `attn2` to the text
(and, for image-to-video, the image context), which keeps its stock processor: SoftPAG's identity map is
defined only where queries and keys are the same tokens. Latents (B, C, F, H, W) are patchified
frame-major by `patch_size` (t, h, w); a call's tokens are F'·H'·W' video tokens, no text in `attn1`.

The model unpatchifies with its *input* batch after the blocks, so extra rows are appended to the call's
inputs (`widen_at_call`).

HeadGuidance and CFG: `WanPipeline` and `WanImageToVideoPipeline` make one call per condition under `cache_context("cond")` and
`("uncond")`; the conditional call is guided. Wan 2.2's two-expert pipelines (`transformer_2` below the
boundary timestep) are refused by pipeline edits; each expert takes model edits on its own.
"""
from __future__ import annotations

import torch

from ..heads import LayerInfo, head_dim
from .base import CallRows, Family


class Wan(Family):
    name = "wan"
    transformer_classes = ("WanTransformer3DModel",)
    stock_processors = ("WanAttnProcessor",)
    guided_pipelines = ("WanPipeline", "WanImageToVideoPipeline")
    rows = CallRows(
        call_args=("hidden_states", "timestep", "encoder_hidden_states", "encoder_hidden_states_image"),
        # not forked at blocks (widen_at_call); what would flow / be mapped there:
        block_stream_args=("hidden_states",),
        block_call_args=("encoder_hidden_states", "temb"),
    )
    text_first = False
    widen_at_call = True
    text_edits_unsupported = ("Wan's text rides in its cross-attention (attn2), not in a joint sequence; "
                              "TextPatch/TextGuard/localize there are not implemented yet")

    # --- layers and processors -------------------------------------------------------------
    def layers(self, transformer) -> list[LayerInfo]:
        return [LayerInfo(i, f"blocks.{i}.attn1", "self", block.attn1.heads, head_dim(block.attn1))
                for i, block in enumerate(transformer.blocks)]

    def attention_processors(self, transformer) -> dict:
        """The self-attention processors only (attn2, the cross-attention, stays stock)."""
        return {f"blocks.{i}.attn1.processor": block.attn1.processor for i, block in enumerate(transformer.blocks)}

    def set_processors(self, transformer, processors: dict) -> None:
        for key, processor in processors.items():
            transformer.get_submodule(key.removesuffix(".processor")).set_processor(processor)

    def layer_of_key(self, key: str, transformer) -> int:
        parts = key.split(".")
        if parts[0] != "blocks" or parts[2] != "attn1":
            raise ValueError(f"{key} is not a self-attention of Wan's blocks")
        return int(parts[1])

    def processor_for(self, key: str, layer: int, state):
        from ..processors.wan import WanSelfAttnProcessor

        return WanSelfAttnProcessor(layer, state)

    def fork_points(self, transformer):
        return []  # widened at the call

    # --- one transformer call ----------------------------------------------------------------
    def text_length(self, call: dict) -> int:
        return 0  # attn1 sees video tokens only

    def grid(self, transformer, call: dict):
        return None, "Wan calls are video (frames × height × width tokens); 3-D local windows are not implemented yet"

    # --- its pipelines -------------------------------------------------------------------------
    def supports_pipeline(self, pipe) -> bool:
        if getattr(pipe, "transformer_2", None) is not None:
            raise NotImplementedError(
                "Wan 2.2 two-expert pipelines (transformer_2) are not supported by pipeline edits yet: dit-attn "
                "would edit `transformer` only and the steps below the boundary would run unedited; model edits "
                "(SoftPAG, LocalAttention) can be applied to each expert: da.apply(pipe.transformer_2, ...)")
        return super().supports_pipeline(pipe)

    def conditional_rows(self, pipe, batch: int, call: dict, context: str | None):
        """The conditional call ("cond", every row); the "uncond" call is left stock."""
        if context not in (None, "cond"):
            return None
        return torch.arange(batch)

    def encode_prompts(self, pipe, prompts, max_sequence_length):
        raise NotImplementedError(f"text edits on Wan: {self.text_edits_unsupported}")

    def latent_patch(self, transformer) -> int:
        return int(transformer.config.patch_size[-1])

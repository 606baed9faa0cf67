"""Wan 2.1 / 2.2 (`WanTransformer3DModel`): blocks `blocks.i` → layer i, each with a self-attention
`attn1` over the video tokens (the layer SoftPAG, HeadGuidance and LocalAttention edit) and a
cross-attention `attn2` to the text (and, for image-to-video, the image context). SoftPAG's identity map is
defined only where queries and keys are the same tokens, so `attn2` is never perturbed; TextPatch and
TextGuard replace its text keys/values, and their layer i is block i's `attn2` (the same numbering as
`attn1`). Without a text edit `attn2` keeps its stock processor. Latents (B, C, F, H, W) are patchified
frame-major by `patch_size` (t, h, w); a call's tokens are F'·H'·W' video tokens, no text in `attn1`.

The model unpatchifies with its *input* batch after the blocks, so extra rows are appended to the call's
inputs (`widen_at_call`): a TextPatch's source rows carry the source prompt's text states and their target
row's latents, timestep and image context, and run to the end. Text enters the model only through `attn2`
(the condition embedder's text projection is per row), so patching every layer gives the source prompt's run.

HeadGuidance and CFG: `WanPipeline` and `WanImageToVideoPipeline` make one call per condition under `cache_context("cond")` and
`("uncond")`; the conditional call is guided (and patched). Wan 2.2's two-expert pipelines run `transformer` (expert E1)
at timesteps at or above `boundary_ratio · num_train_timesteps` (the high-noise steps, first) and `transformer_2` (E2)
below it: `apply` installs on each expert (`dit_attn.handle.experts`), both take their own calls under the same
cache contexts, and HeadGuidance adds its term on the step of whichever expert ran.
"""
from __future__ import annotations

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
    makes_videos = True
    video_capture = True  # Capture: cross maps from attn2's softmax over the text keys, self maps from attn1
    nag = True  # in the cross-attention attn2: the negative rows' text with the positive rows' video queries
    negative_embeds_extra = ""

    # --- layers and processors -------------------------------------------------------------
    def layers(self, transformer) -> list[LayerInfo]:
        return [LayerInfo(i, f"blocks.{i}.attn1", "self", block.attn1.heads, head_dim(block.attn1))
                for i, block in enumerate(transformer.blocks)]

    def attention_processors(self, transformer) -> dict:
        """Every block's self-attention and cross-attention processor."""
        return {f"blocks.{i}.{name}.processor": getattr(block, name).processor
                for i, block in enumerate(transformer.blocks) for name in ("attn1", "attn2")}

    def set_processors(self, transformer, processors: dict) -> None:
        """None (from `processor_for`) leaves that module's processor in place."""
        for key, processor in processors.items():
            if processor is not None:
                transformer.get_submodule(key.removesuffix(".processor")).set_processor(processor)

    def layer_of_key(self, key: str, transformer) -> int:
        parts = key.split(".")
        if parts[0] != "blocks" or parts[2] not in ("attn1", "attn2"):
            raise ValueError(f"{key} is not an attention of Wan's blocks")
        return int(parts[1])

    def processor_for(self, key: str, layer: int, state):
        """attn1: dit-attn's self-attention processor; attn2: the cross-attention one when a text edit
        patches it, NAG combines its outputs or a Capture reads it, else None (the stock processor stays)."""
        from ..processors.wan import WanCrossAttnProcessor, WanSelfAttnProcessor

        if key.split(".")[2] == "attn1":
            return WanSelfAttnProcessor(layer, state)
        crossed = state.patch_layers or state.nag is not None or state.capture is not None
        return WanCrossAttnProcessor(layer, state) if crossed else None

    def nag_text_states(self, transformer, embeds):
        """The condition embedder's text projection (what every block's attn2 gets for the text)."""
        embedder = transformer.condition_embedder.text_embedder
        return embedder(embeds.to(device=transformer.device, dtype=transformer.dtype))

    def fork_points(self, transformer):
        return []  # widened at the call

    # --- one transformer call ----------------------------------------------------------------
    def text_length(self, call: dict) -> int:
        """The text tokens of the call's cross-attention (what TextPatch's source prompts are encoded to);
        the self-attention attn1 sees video tokens only."""
        text = call.get("encoder_hidden_states")
        return 0 if text is None else text.shape[1]

    def grid(self, transformer, call: dict):
        """(frames, rows, cols) of the call's video tokens: latents (B, C, F, H, W) over `patch_size` (t, h, w)."""
        frames, height, width = call["hidden_states"].shape[-3:]
        patch_t, patch_h, patch_w = transformer.config.patch_size
        return (frames // patch_t, height // patch_h, width // patch_w), ""

    # --- its pipelines -------------------------------------------------------------------------
    def conditional_rows(self, pipe, batch: int, call: dict, context: str | None):
        """The conditional call ("cond", every row); the "uncond" call is left stock."""
        if context not in (None, "cond"):
            return None
        return range(batch)

    def encode_prompts(self, pipe, prompts, max_sequence_length):
        """(text states (N, S, D), an empty (N, 0) tensor: Wan has no pooled embedding). The pipelines pad
        every prompt to `max_sequence_length` with zero states, so a call's text length is that length."""
        embeds, _ = pipe.encode_prompt(prompt=list(prompts), do_classifier_free_guidance=False, num_videos_per_prompt=1,
                                       max_sequence_length=max_sequence_length or 512)
        return embeds, embeds.new_zeros(embeds.shape[0], 0)

    def latent_patch(self, transformer) -> int:
        return int(transformer.config.patch_size[-1])

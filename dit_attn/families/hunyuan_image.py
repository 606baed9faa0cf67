"""HunyuanImage 2.1 (`HunyuanImageTransformer2DModel`): double-stream blocks `transformer_blocks.i` → layer i,
then single-stream blocks `single_transformer_blocks.j` → (number of double blocks) + j; joint sequence
[image ; text]; latents (B, C, H, W) patchified row-major by `patch_size`; rotary on the image tokens only.

The text of a call is the Qwen text states (`encoder_hidden_states`) refined by the model's token
refiner (whose attention modules keep their stock processors: they are not layers), followed — when
the model has a ByT5 projection and the call passes glyph states — by the ByT5 states, each row's
tokens reordered by its own masks as [valid ByT5 ; valid Qwen ; padding ByT5 ; padding Qwen]. The
blocks always get a bool key mask (B, 1, 1, image + text) over that padding.

The model unpatchifies with its *input* batch after the blocks, so extra rows are appended to the
call's inputs (`widen_at_call`).

Text edits (TextPatch, TextGuard, NAG): the pipeline pads every prompt to the same Qwen and ByT5 token
counts, so a source (or negative) prompt's states, masks and glyph states ride as extra rows of the call
at the call's own lengths; the model refines and reorders each row by its own masks, and the processors
give a target row its source row's whole text segment (keys, values and key mask). Text has no rotary
positions here, so nothing else needs aligning. NAG over layers 0…k instead appends the negative prompt's text,
refined once per call as the model does a row's, to every row's text in the blocks (`hooks.nag_tokens`).

HeadGuidance and CFG: the pipeline runs one call per condition of its guider
(`AdaptiveProjectedMixGuidance`) under `cache_context("pred_cond")` and `("pred_uncond")` (left stock),
conditional first, then takes the guider's combination (CFG, later APG with its momentum buffer);
HeadGuidance's s·(ε_c − ε_p) is added to that combination. Guidance-distilled models (no guider, or a
disabled one) make the single "pred_cond" call a step and take `guidance` as an input.
"""
from __future__ import annotations

import torch

from ..heads import LayerInfo, head_dim
from .base import CallRows, Family

_BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")


class HunyuanImage(Family):
    name = "hunyuan_image"
    transformer_classes = ("HunyuanImageTransformer2DModel",)
    stock_processors = ("HunyuanImageAttnProcessor",)
    guided_pipelines = ("HunyuanImagePipeline",)
    rows = CallRows(
        call_args=("hidden_states", "timestep", "encoder_hidden_states", "encoder_attention_mask", "timestep_r",
                   "encoder_hidden_states_2", "encoder_attention_mask_2", "guidance"),
        # not forked at blocks (widen_at_call); what would flow / be mapped there:
        block_stream_args=("hidden_states", "encoder_hidden_states", "x"),
        block_call_args=("temb", "attention_mask", "conditioning_embedding"),
    )
    text_first = False
    widen_at_call = True
    rotary = False  # a `rope` module with (cos, sin) tables, not a `pos_embed` with `theta`
    nag = True
    negative_embeds_extra, negative_mask_required = "glyphs", True  # Qwen states and mask, ByT5 glyph states and mask

    # --- layers and processors -------------------------------------------------------------
    def _blocks(self, transformer) -> list:
        return list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)

    def layers(self, transformer) -> list[LayerInfo]:
        layers = [LayerInfo(i, f"transformer_blocks.{i}.attn", "double", block.attn.heads, head_dim(block.attn))
                  for i, block in enumerate(transformer.transformer_blocks)]
        n = len(layers)
        layers += [LayerInfo(n + j, f"single_transformer_blocks.{j}.attn", "single", block.attn.heads,
                             head_dim(block.attn))
                   for j, block in enumerate(transformer.single_transformer_blocks)]
        return layers

    def attention_processors(self, transformer) -> dict:
        """The blocks' processors only (the token refiner's attention stays stock)."""
        return {f"{name}.{i}.attn.processor": block.attn.processor
                for name in _BLOCK_LISTS for i, block in enumerate(getattr(transformer, name))}

    def layer_of_key(self, key: str, transformer) -> int:
        block_list, index = key.split(".")[:2]
        if block_list not in _BLOCK_LISTS:
            raise ValueError(f"{key} is not an attention of HunyuanImage's blocks")
        return int(index) + (len(transformer.transformer_blocks) if block_list == "single_transformer_blocks" else 0)

    def processor_for(self, key: str, layer: int, state):
        from ..processors.hunyuan_image import HunyuanImageAttnProcessor

        return HunyuanImageAttnProcessor(layer, state)

    def fork_points(self, transformer):
        return []  # widened at the call

    # --- one transformer call ----------------------------------------------------------------
    def text_length(self, call: dict) -> int:
        """Qwen text tokens plus the ByT5 glyph tokens when the call passes them (a model without a ByT5
        projection ignores them: its processors read the text length from their inputs)."""
        length = 0
        for name in ("encoder_hidden_states", "encoder_hidden_states_2"):
            text = call.get(name)
            if text is not None:
                length += text.shape[1]
        return length

    def grid(self, transformer, call: dict):
        hidden = call.get("hidden_states")
        if hidden is None:
            return None, "the call has no hidden_states"
        patch = tuple(int(p) for p in transformer.config.patch_size)
        if hidden.ndim == 5:
            if hidden.shape[2] // patch[0] != 1:
                return None, "the call has several frames of image tokens; local windows cover one image grid"
            patch = patch[1:]
        return (hidden.shape[-2] // patch[-2], hidden.shape[-1] // patch[-1]), ""

    # --- its pipelines -------------------------------------------------------------------------
    def conditional_rows(self, pipe, batch: int, call: dict, context: str | None):
        """The guider's conditional call ("pred_cond", every row); its other calls are left stock."""
        if context not in (None, "pred_cond"):
            return None
        return range(batch)

    def encode_prompts(self, pipe, prompts, max_sequence_length):
        """(Qwen text states (N, S, D), the rest as one (N, S + S2 + S2·D2) tensor: the Qwen mask, the ByT5
        glyph mask and the glyph states (S2 × D2) flattened), from the pipeline's own `encode_prompt` at its
        padded lengths; `predict` reads the leading Qwen mask, `append_text_rows` all of it."""
        embeds, mask, glyphs, glyph_mask = pipe.encode_prompt(prompt=list(prompts), batch_size=len(prompts),
                                                              num_images_per_prompt=1)
        return embeds, packed_text(embeds, mask, glyphs, glyph_mask)

    def given_negative(self, nag, text_len: int):
        """The given Qwen states at the call's length, their mask and the glyph states packed as `encode_prompts`
        packs them (the glyph length is checked against the call's in `text_inputs`)."""
        embeds = self.at_call_length(nag.negative_prompt_embeds, text_len)
        return embeds, packed_text(embeds, nag.negative_prompt_embeds_mask, nag.negative_prompt_embeds_2,
                                   nag.negative_prompt_embeds_mask_2)

    def append_text_rows(self, call: dict, embeds, extra, padded: bool = True) -> dict:
        """The source prompts' states, masks and (when the call has them) glyph states appended as rows."""
        added = self.text_inputs(call, embeds, extra)
        return {name: torch.cat([call[name], value]) for name, value in added.items()}

    def text_inputs(self, call: dict, embeds, extra) -> dict:
        """The call's text inputs (states, masks and, when the call has them, glyph states) of prompts encoded by
        `encode_prompts`, as the call's dtypes and lengths."""
        text, mask = call["encoder_hidden_states"], call["encoder_attention_mask"]
        length = text.shape[1]
        if embeds.shape[1:] != text.shape[1:]:
            raise RuntimeError(f"{self.name}: the source prompt encodes to {tuple(embeds.shape[1:])} text states, "
                               f"the call has {tuple(text.shape[1:])}")
        out = {"encoder_hidden_states": embeds.to(text), "encoder_attention_mask": extra[:, :length].to(mask)}
        glyphs, glyph_mask = call.get("encoder_hidden_states_2"), call.get("encoder_attention_mask_2")
        if glyphs is not None:
            glyph_len = glyphs.shape[1]
            if extra.shape[1] != length + glyph_len * (1 + glyphs.shape[2]):
                raise ValueError(f"{self.name}: the call has {glyph_len} ByT5 glyph tokens, the source (or NAG's given "
                                 f"negative_prompt_embeds_2) {(extra.shape[1] - length) // (1 + glyphs.shape[2])}: encode "
                                 "it with this pipeline's own encode_prompt")
            out["encoder_hidden_states_2"] = extra[:, length + glyph_len:].unflatten(1, glyphs.shape[1:]).to(glyphs)
            out["encoder_attention_mask_2"] = extra[:, length:length + glyph_len].to(glyph_mask)
        return out

    # --- training --------------------------------------------------------------------------------
    def latent_patch(self, transformer) -> int:
        return int(transformer.config.patch_size[-1])

    def predict(self, transformer, x_t, embeds, pooled, t, latent_hw, guidance=1.0):
        """`pooled`: from `encode_prompts` (its leading S columns are the Qwen text mask) or the mask alone
        (None: no padding); no glyph states (the pipeline's all-padding ByT5 states for a prompt without
        quoted text are masked out); timestep 1000·t; a guidance-distilled model gets guidance
        1000·`guidance` as in the pipeline."""
        device, dtype = transformer.device, transformer.dtype
        mask = torch.ones(embeds.shape[:2], dtype=torch.long) if pooled is None else pooled[:, : embeds.shape[1]]
        guide = torch.full((x_t.shape[0],), float(guidance) * 1000.0, device=device, dtype=dtype) \
            if transformer.config.guidance_embeds else None
        return transformer(hidden_states=x_t.to(device, dtype), timestep=(t * 1000).to(device, dtype),
                           encoder_hidden_states=embeds.to(device, dtype), encoder_attention_mask=mask.to(device),
                           guidance=guide, return_dict=False)[0]


def packed_text(embeds: torch.Tensor, mask: torch.Tensor, glyphs: torch.Tensor, glyph_mask: torch.Tensor) -> torch.Tensor:
    """A prompt's text inputs beside its Qwen states, as one (N, S + S2 + S2·D2) tensor of the states' dtype: the
    Qwen mask, the ByT5 glyph mask and the glyph states flattened (`HunyuanImage.text_inputs` unpacks it)."""
    return torch.cat([mask.to(embeds), glyph_mask.to(embeds), glyphs.to(embeds).flatten(1)], dim=1)

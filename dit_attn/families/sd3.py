"""SD3 / SD3.5 (`SD3Transformer2DModel`): joint blocks `transformer_blocks.i` → layer i, [image ; text]
tokens, latents (B, C, H, W) patchified row-major; SD3.5's dual-attention blocks add an
image-only `attn2` that shares the block's layer number."""
from __future__ import annotations

from ..heads import LayerInfo, head_dim
from .base import CallRows, Family
from .image_latents import decode_kl, encode_kl


class SD3(Family):
    name = "sd3"
    transformer_classes = ("SD3Transformer2DModel",)
    stock_processors = ("JointAttnProcessor2_0",)
    ip_adapter_processors = ("SD3IPAdapterJointAttnProcessor2_0",)
    guided_pipelines = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline")
    controlnet_pipelines = ("StableDiffusion3ControlNetPipeline", "StableDiffusion3ControlNetInpaintingPipeline")
    rows = CallRows(
        call_args=("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"),
        block_stream_args=("hidden_states", "encoder_hidden_states", "x"),  # "x": norm_out's input
        block_call_args=("temb", "conditioning_embedding"),  # per-row inputs of blocks and of norm_out
        controlnet_args=("block_controlnet_hidden_states",),
        # IP-Adapter's image states and their timestep embedding
        block_kwargs_args=("joint_attention_kwargs.ip_hidden_states", "joint_attention_kwargs.temb"),
    )
    text_first = False
    nag = True
    negative_embeds_extra = "pooled"
    nag_alpha = 0.125  # the official SD3 NAG pipeline's

    def layers(self, transformer) -> list[LayerInfo]:
        return [
            LayerInfo(i, f"transformer_blocks.{i}.attn", "joint", block.attn.heads, head_dim(block.attn),
                      getattr(block, "attn2", None) is not None)
            for i, block in enumerate(transformer.transformer_blocks)
        ]

    def layer_of_key(self, key: str, transformer) -> int:
        return int(key.split(".")[1])

    def attention_processors(self, transformer) -> dict:
        # an IP-Adapter's image projection (`image_proj`) has attention modules of its own
        return {key: p for key, p in super().attention_processors(transformer).items()
                if key.startswith("transformer_blocks.")}

    def processor_for(self, key: str, layer: int, state):
        from ..processors.sd3 import SD3AttnProcessor

        return SD3AttnProcessor(layer, state, joint=key.split(".")[2] == "attn")

    def fork_points(self, transformer):
        blocks = list(transformer.transformer_blocks)
        return [(block, i) for i, block in enumerate(blocks)] + [(transformer.norm_out, len(blocks))]

    def grid(self, transformer, call: dict):
        hidden = call["hidden_states"]
        patch = transformer.config.patch_size
        return (hidden.shape[-2] // patch, hidden.shape[-1] // patch), ""

    def conditional_rows(self, pipe, batch: int, call: dict, context: str | None):
        """CFG is one batched call, rows [uncond..., cond...]; skip-layer guidance is a separate call (left stock)."""
        if call.get("skip_layers") is not None:
            return None
        if pipe.do_classifier_free_guidance:
            return range(batch // 2, batch)
        return range(batch)

    def encode_prompts(self, pipe, prompts, max_sequence_length):
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=max_sequence_length or 256,
        )
        return embeds, pooled

    def sequence_length_of_call(self, pipe, text_length: int) -> int:
        # the text states are the CLIP tokens (padded to the tokenizer length) followed by the T5 tokens
        t5_tokens = text_length - pipe.tokenizer_max_length
        if t5_tokens < 1:
            raise ValueError(f"cannot read max_sequence_length from a call with {text_length} text tokens")
        return t5_tokens

    def encode_image_latents(self, pipe, pixels):
        return encode_kl(pipe.vae, pixels)

    def decode_image_latents(self, pipe, latents):
        return decode_kl(pipe.vae, latents)

    def max_token_side(self, transformer) -> int | None:
        # the position embedding is cropped from a table of pos_embed_max_size² patches
        size = transformer.config.get("pos_embed_max_size") if hasattr(transformer.config, "get") else None
        return int(size) if size else None

    def predict(self, transformer, x_t, embeds, pooled, t, latent_hw, guidance=1.0):
        device, dtype = transformer.device, transformer.dtype
        return transformer(hidden_states=x_t.to(device, dtype), encoder_hidden_states=embeds.to(device, dtype),
                           pooled_projections=pooled.to(device, dtype), timestep=(t * 1000).to(device, dtype)).sample

"""A random-weight Ovis-Image pipeline built from configs (FLUX.1's block layout, 16 latent channels).

Ovis-Image encodes prompts with Qwen3 behind a chat template. By default the pipeline has
`text_encoder=None` and `tokenizer=None` and is called with `prompt_embeds` (and `negative_prompt_embeds`
when CFG is on, since the stock pipeline would encode an empty negative prompt otherwise) and
`negative_prompt=None` (its default "" may not be given with `negative_prompt_embeds`). `text_encoder=True`
gives it Z-Image's tiny Qwen3 and chat-template tokenizer (16 wide: the transformer's text width follows),
with the pipeline's count of template tokens to drop (28 with the real tokenizer) counted for this one.
"""
from __future__ import annotations

import torch
from diffusers import OvisImagePipeline, OvisImageTransformer2DModel

from .configs import TEXT_HIDDEN, _vae, flux_rope_axes, flux_scheduler, text_embeds

__all__ = ["build_ovis_image_pipeline", "text_embeds"]


def build_ovis_image_pipeline(*, num_layers: int = 1, num_single_layers: int = 2, num_heads: int = 2,
                              head_dim: int = 16, text_encoder: bool = False, seed: int = 0) -> OvisImagePipeline:
    """Rotary axes from `flux_rope_axes`; text states are TEXT_HIDDEN wide (the encoder's width with one)."""
    from .z_image import Z_IMAGE_TEXT_HIDDEN, _text_encoder, make_z_image_tokenizer

    torch.manual_seed(seed)
    transformer = OvisImageTransformer2DModel(
        patch_size=1,
        in_channels=64,
        out_channels=64,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=head_dim,
        num_attention_heads=num_heads,
        joint_attention_dim=Z_IMAGE_TEXT_HIDDEN if text_encoder else TEXT_HIDDEN,
        axes_dims_rope=flux_rope_axes(head_dim),
    ).eval()
    scheduler = flux_scheduler()
    tokenizer = make_z_image_tokenizer() if text_encoder else None
    pipe = OvisImagePipeline(scheduler=scheduler, vae=_vae(seed, 16, 0.3611, 0.1159),
                             text_encoder=_text_encoder(tokenizer, seed) if text_encoder else None,
                             tokenizer=tokenizer, transformer=transformer)
    if text_encoder:  # the user turn's header and the system prompt, up to its closing colon
        header = pipe._get_messages("")[0][: pipe._get_messages("")[0].index(pipe.system_prompt)] + pipe.system_prompt
        pipe.user_prompt_begin_id = len(tokenizer(header.rstrip(" "), add_special_tokens=False)["input_ids"])
    return pipe

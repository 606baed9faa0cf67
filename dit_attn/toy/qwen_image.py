"""A tiny random-weight Qwen-Image pipeline built from configs in memory (nothing is downloaded).

The shapes follow diffusers' own dummy components for its QwenImage tests: a dual-stream
transformer with 16 input channels (4 latent channels packed 2×2) and 4 output channels,
a 3-level Qwen-Image VAE (spatial factor 4), and a 2-layer, 16-wide Qwen2.5-VL text encoder.
The tokenizer is a byte-level BPE built here whose words of the pipeline's prompt template
are one token each, so that the template's first 34 tokens — the ones the pipeline drops —
are exactly the system prompt and the user turn's header, as with the real tokenizer.

At 32×32 pixels a call has 4×4 = 16 image tokens and as many text tokens as the longest
prompt of the call has tokens plus 5 (the template's tail), e.g. 8 for "a red circle".

`build_qwen_image_edit_pipeline` adds what Qwen-Image-Edit's encoder needs to see the reference
image: Qwen's vision tokens in the tokenizer (with the encoder's vision token ids pointing at them),
the 2-layer vision tower of the same Qwen2.5-VL config, and a Qwen2-VL processor for images only
(transformers' own `Qwen2VLProcessor` also builds a video processor, which needs torchvision).
"""
from __future__ import annotations

import torch
from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin

from .configs import _WORDS, _apply_merges, _byte_chars

__all__ = ["QWEN_TEXT_HIDDEN", "build_qwen_image_edit_pipeline", "build_qwen_image_pipeline", "make_qwen_tokenizer"]

QWEN_TEXT_HIDDEN = 16
_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_VISION = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
_TEMPLATE_WORDS = (
    "system", "user", "assistant", "Describe", "the", "image", "by", "detailing", "color", "shape", "size",
    "texture", "quantity", "text", "spatial", "relationships", "of", "objects", "and", "background",
)  # fmt: skip


def make_qwen_tokenizer() -> Qwen2Tokenizer:
    """A byte-level BPE Qwen2 tokenizer: every byte, each word of the template and of the toy
    vocabulary as one token (with and without its leading space), and Qwen's chat special tokens."""
    byte_chars = _byte_chars()
    space = byte_chars[ord(" ")]
    tokens = list(byte_chars)
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(_TEMPLATE_WORDS + _WORDS):
        for piece in (word, space + word):
            symbols = _apply_merges(list(piece), ranks)
            while len(symbols) > 1:
                ranks[(symbols[0], symbols[1])] = len(ranks)
                tokens.append(symbols[0] + symbols[1])
                symbols = _apply_merges(symbols, ranks)
    tokens += list(_SPECIAL)
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=list(ranks))
    tokenizer.add_special_tokens({"additional_special_tokens": list(_SPECIAL[1:])})
    return tokenizer


def _text_encoder(tokenizer: Qwen2Tokenizer, seed: int, vision: bool = False) -> Qwen2_5_VLForConditionalGeneration:
    """vision=True: the tokenizer has `_VISION`'s tokens and the encoder's vision ids are theirs."""
    vocab_size = len(tokenizer)
    special = tokenizer.convert_tokens_to_ids(list(_SPECIAL))
    # without vision tokens: ids past the vocabulary (the tokenizer never produces them)
    start, end, image, video = tokenizer.convert_tokens_to_ids(list(_VISION)) if vision else range(vocab_size + 1, vocab_size + 5)
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": QWEN_TEXT_HIDDEN,
            "intermediate_size": QWEN_TEXT_HIDDEN,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
            "vocab_size": vocab_size,
            "bos_token_id": special[1],
            "eos_token_id": special[2],
            "pad_token_id": special[0],
        },
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=QWEN_TEXT_HIDDEN,
        vocab_size=vocab_size,
        bos_token_id=special[1],
        eos_token_id=special[2],
        pad_token_id=special[0],
        vision_start_token_id=start,
        vision_end_token_id=end,
        vision_token_id=image,
        image_token_id=image,
        video_token_id=video,
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def build_qwen_image_pipeline(
    *,
    num_layers: int = 3,
    num_heads: int = 4,
    head_dim: int = 16,
    zero_cond_t: bool = False,
    text_encoder: bool = True,
    seed: int = 0,
) -> QwenImagePipeline:
    """A random-weight QwenImagePipeline; `text_encoder=False` leaves the encoder and tokenizer out
    (then pass `prompt_embeds`). Rotary axes split `head_dim` as (t, h, w) = (D/2, D/4, D/4)."""
    if head_dim % 8:
        raise ValueError(f"head_dim must be a multiple of 8 (rotary axes D/2, D/4, D/4 of even sizes), got {head_dim}")
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=num_layers,
        attention_head_dim=head_dim,
        num_attention_heads=num_heads,
        joint_attention_dim=QWEN_TEXT_HIDDEN,
        guidance_embeds=False,
        axes_dims_rope=(head_dim // 2, head_dim // 4, head_dim // 4),
        zero_cond_t=zero_cond_t,
    ).eval()
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(
        base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    ).eval()
    tokenizer = encoder = None
    if text_encoder:
        tokenizer = make_qwen_tokenizer()
        encoder = _text_encoder(tokenizer, seed)
    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=encoder, tokenizer=tokenizer,
        transformer=transformer,
    )


class ImageQwen2VLProcessor(Qwen2VLProcessor):
    """transformers' Qwen2-VL processor for text and images, without its video processor."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def build_qwen_image_edit_pipeline(*, num_layers: int = 3, num_heads: int = 4, head_dim: int = 16, seed: int = 0):
    """A random-weight QwenImageEditPipeline whose encoder sees the reference image. The pipeline drops the
    tokens of its template's system turn and user header (64 with the real tokenizer; counted here)."""
    from diffusers import QwenImageEditPipeline
    from transformers import Qwen2VLImageProcessor

    parts = build_qwen_image_pipeline(num_layers=num_layers, num_heads=num_heads, head_dim=head_dim,
                                      text_encoder=False, seed=seed).components
    tokenizer = make_qwen_tokenizer()
    tokenizer.add_tokens(list(_VISION), special_tokens=True)
    processor = ImageQwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer)
    pipe = QwenImageEditPipeline(scheduler=parts["scheduler"], vae=parts["vae"], transformer=parts["transformer"],
                                 text_encoder=_text_encoder(tokenizer, seed, vision=True), tokenizer=tokenizer,
                                 processor=processor)
    header = pipe.prompt_template_encode[: pipe.prompt_template_encode.index("<|vision_start|>")]
    pipe.prompt_template_encode_start_idx = len(tokenizer(header)["input_ids"])
    return pipe

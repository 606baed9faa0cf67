"""Qwen-Image (`QwenImageTransformer2DModel`): dual-stream blocks `transformer_blocks.i` → layer i,
joint sequence [text ; image (; Qwen-Image-Edit's reference tokens, sliced off the prediction by
the pipeline: HeadGuidance's term is taken on the generated tokens)]; 2×2-packed latent tokens;
RMS q/k norms and complex rotary tables for image and text; a joint bool key mask from
`encoder_hidden_states_mask` when the prompts of a call are padded.

Per-row block inputs computed once per call: `temb` (2B rows, [t ; 0], for `zero_cond_t`
models: `hooks.calls` maps an input with k·N rows for N call rows as k blocks of them),
`encoder_hidden_states_mask`, `modulate_index` (one row per entry of `img_shapes`, which the
pipelines give per prompt: a single row broadcasts over the images of one prompt).

HeadGuidance and CFG: the pipelines make the conditional call under `cache_context("cond")`
and the negative one under `cache_context("uncond")` (left stock), then take
ε_cfg = ε_u + w·(ε_c − ε_u) rescaled to ε_c's norm per token, ε_cfg·‖ε_c‖/‖ε_cfg‖.
HeadGuidance's s·(ε_c − ε_p) is added to the prediction the scheduler step gets, i.e. after
the CFG combination *and* its rescale: the rescale is the pipeline's own arithmetic on its two
predictions (as SD3's CFG or FLUX's true CFG are), and adding the perturbation term after it
keeps it the same term, s·(ε_c − ε_p), with CFG on or off; folded in before the rescale it would
be multiplied by the per-token norm ratio, and its strength would depend on the CFG scale.

Text edits on Qwen-Image-Edit: its encoder reads the prompt together with the reference image (the
image's vision tokens are part of the text states), so a source or negative prompt is encoded with
the image the pipeline handed its own `encode_prompt`; NAG's negative rows take the positive rows'
whole image stream, generated and reference tokens alike.
"""
from __future__ import annotations

import torch

from ..heads import LayerInfo, head_dim
from .base import CallRows, Family, appended_text


EDIT_PIPELINES = ("QwenImageEditPipeline",)


def first_image_shape(img_shapes) -> tuple[list[tuple[int, int, int]] | None, str]:
    """The (frames, rows, cols) entries of the first row's images in a call's `img_shapes`, or (None, why)."""
    if not img_shapes:
        return None, "the call has no img_shapes"
    entry = img_shapes[0]
    shapes = list(entry) if isinstance(entry, list) else [entry]
    if not all(isinstance(s, (tuple, list)) and len(s) == 3 for s in shapes):
        return None, f"img_shapes entries are not (frames, rows, cols): {entry!r}"
    return [tuple(int(x) for x in s) for s in shapes], ""


def latent_statistics(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, 1/std) (1, C, 1, 1) of the VAE's latents, by which the pipelines normalise them: (z − mean)·(1/std)."""
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1)
    inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)
    return mean.to(like.device, like.dtype), inverse_std.to(like.device, like.dtype)


class QwenImage(Family):
    name = "qwen_image"
    transformer_classes = ("QwenImageTransformer2DModel",)
    stock_processors = ("QwenDoubleStreamAttnProcessor2_0",)
    guided_pipelines = ("QwenImagePipeline", "QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline",
                        "QwenImageEditPipeline")
    controlnet_pipelines = ("QwenImageControlNetPipeline", "QwenImageControlNetInpaintPipeline")
    rows = CallRows(
        call_args=("hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask", "timestep", "guidance",
                   "additional_t_cond"),
        block_stream_args=("hidden_states", "encoder_hidden_states", "x"),  # "x": norm_out's input
        block_call_args=("temb", "encoder_hidden_states_mask", "modulate_index", "conditioning_embedding"),
        controlnet_args=("controlnet_block_samples",),
    )
    text_first = True
    packs_latents = True
    reference_tokens_trail = True  # Qwen-Image-Edit appends the reference latents and keeps the leading tokens
    nag = True  # its processor applies NAG (nag_image_inputs / nag_guide)
    negative_embeds_extra = "mask"

    def layers(self, transformer) -> list[LayerInfo]:
        return [LayerInfo(i, f"transformer_blocks.{i}.attn", "double", block.attn.heads, head_dim(block.attn))
                for i, block in enumerate(transformer.transformer_blocks)]

    def layer_of_key(self, key: str, transformer) -> int:
        return int(key.split(".")[1])

    def processor_for(self, key: str, layer: int, state):
        from ..processors.qwen_image import QwenImageAttnProcessor

        return QwenImageAttnProcessor(layer, state)

    def fork_points(self, transformer):
        blocks = list(transformer.transformer_blocks)
        return [(block, i) for i, block in enumerate(blocks)] + [(transformer.norm_out, len(blocks))]

    def grid(self, transformer, call: dict):
        shapes, why = first_image_shape(call.get("img_shapes"))
        if shapes is None:
            return None, why
        # Qwen-Image-Edit's edit-reference images follow the generated one: the grid is the generated image's
        frames, rows, cols = shapes[0]
        tokens = call["hidden_states"].shape[1]
        if frames != 1 or sum(f * h * w for f, h, w in shapes) != tokens:
            return None, f"img_shapes {shapes} does not describe the call's {tokens} image tokens"
        return (rows, cols), ""

    def conditional_rows(self, pipe, batch: int, call: dict, context: str | None):
        """Two calls a step with true CFG: the conditional one under cache context "cond", the negative
        one under "uncond" (left stock); without a negative prompt only the "cond" call."""
        if context == "uncond":
            return None
        return range(batch)

    def encoder_inputs(self, pipe) -> tuple[str, ...]:
        """Inputs of the pipeline's own `encode_prompt` call that other prompts are encoded with too."""
        return ("image",) if type(pipe).__name__ in EDIT_PIPELINES else ()

    def encode_prompts(self, pipe, prompts, max_sequence_length, image=None):
        """(text states (N, S, D), text mask (N, S)); with `max_sequence_length` exactly that many tokens
        (shorter prompts padded with masked zero states, as in a call with a longer prompt; longer ones cut
        there, as Qwen-Image's own `max_sequence_length` does). Qwen-Image-Edit: each prompt with `image`."""
        if type(pipe).__name__ in EDIT_PIPELINES:
            if image is None:
                raise ValueError(f"{type(pipe).__name__} encodes each prompt with its reference image: pass the image")
            encoded = [self._with_mask(*pipe.encode_prompt(prompt=[p], image=image, num_images_per_prompt=1))
                       for p in prompts]
            longest = max(e.shape[1] for e, _ in encoded)
            pad = lambda x, n: torch.nn.functional.pad(x, (0, 0) * (x.ndim - 2) + (0, n - x.shape[1]))  # noqa: E731
            embeds = torch.cat([pad(e, longest) for e, _ in encoded])
            mask = torch.cat([pad(m, longest) for _, m in encoded])
        else:
            embeds, mask = self._with_mask(*pipe.encode_prompt(prompt=list(prompts), num_images_per_prompt=1,
                                                               max_sequence_length=max_sequence_length or 512))
        return self._at_length(embeds, mask, max_sequence_length) if max_sequence_length is not None else (embeds, mask)

    @staticmethod
    def _with_mask(embeds, mask):
        """The pipelines give no mask when no prompt is padded."""
        return embeds, mask if mask is not None else Family.all_tokens(embeds)

    @staticmethod
    def _at_length(embeds, mask, length: int):
        """(text states, mask) of exactly `length` tokens: cut there, or padded with masked zero states."""
        embeds, mask = embeds[:, :length], mask[:, :length]
        pad = length - embeds.shape[1]
        return torch.nn.functional.pad(embeds, (0, 0, 0, pad)), torch.nn.functional.pad(mask, (0, pad))

    def given_negative(self, nag, text_len: int):
        """At the call's text length as `encode_prompts` gives it."""
        return self._at_length(*self._with_mask(nag.negative_prompt_embeds, nag.negative_prompt_embeds_mask), text_len)

    def source_text_padded(self, extra) -> bool:
        return not bool((extra != 0).all())

    def append_text_rows(self, call: dict, embeds, extra, padded: bool = True) -> dict:
        """`extra` is the source prompts' text mask; the call's mask is None when no prompt of it is padded."""
        text = call["encoder_hidden_states"]
        widened = appended_text(call, embeds)
        mask = call.get("encoder_hidden_states_mask")
        source = extra.to(text.device) != 0
        if mask is None and not padded:
            joint = None
        else:
            stock = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device) if mask is None else mask.bool()
            joint = torch.cat([stock, source])
            if mask is not None:
                joint = joint.to(mask.dtype)
        return {"encoder_hidden_states": widened, "encoder_hidden_states_mask": joint}

    # image latents: the video VAE's latents of one frame, normalised per channel by its latents_mean/latents_std
    @torch.no_grad()
    def encode_image_latents(self, pipe, pixels):
        vae = pipe.vae
        z = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)[:, :, None]).latent_dist.mode()[:, :, 0]
        mean, inverse_std = latent_statistics(vae, z)
        return (z - mean) * inverse_std

    @torch.no_grad()
    def decode_image_latents(self, pipe, latents):
        vae = pipe.vae
        z = latents.to(device=vae.device, dtype=vae.dtype)
        mean, inverse_std = latent_statistics(vae, z)
        return vae.decode((z / inverse_std + mean)[:, :, None]).sample[:, :, 0]

    def latent_channels(self, pipe) -> int:
        return int(pipe.vae.config.z_dim)

    def latent_patch(self, transformer) -> int:
        return 2

    def predict(self, transformer, x_t, embeds, pooled, t, latent_hw, guidance=1.0):
        """`pooled` is the text mask from `encode_prompts` (or None); Qwen-Image is not guidance-distilled."""
        device, dtype = transformer.device, transformer.dtype
        mask = None
        if pooled is not None and not bool((pooled != 0).all()):
            mask = pooled.to(device) != 0
        h, w = latent_hw
        return transformer(hidden_states=x_t.to(device, dtype), encoder_hidden_states=embeds.to(device, dtype),
                           encoder_hidden_states_mask=mask, timestep=t.to(device, dtype),
                           img_shapes=[[(1, h // 2, w // 2)]] * x_t.shape[0]).sample

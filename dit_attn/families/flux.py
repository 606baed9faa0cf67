"""FLUX.1 (`FluxTransformer2DModel`): double blocks `transformer_blocks.i` → layer i, then single
blocks `single_transformer_blocks.j` → (number of double blocks) + j; [text ; image] tokens;
2×2-packed latent tokens with position ids (0, row, col)."""
from __future__ import annotations

import torch

from ..heads import LayerInfo, head_dim
from .base import CallRows, Family
from .image_latents import decode_kl, encode_kl


def image_ids(h: int, w: int) -> torch.Tensor:
    """Position ids (S, 3) of an h × w latent grid packed into (h/2)·(w/2) tokens: (0, row, col)."""
    rows = torch.arange(h // 2).repeat_interleave(w // 2)
    cols = torch.arange(w // 2).repeat(h // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).float()


@torch.compiler.disable  # reads the ids' values: one graph break at the start of a call, none in the blocks
def grid_from_ids(img_ids: torch.Tensor | None, image_tokens: int) -> tuple[tuple[int, int] | None, str]:
    """(rows, cols) of the generated image's tokens from their position ids, or (None, why) when they are
    not a full row-major grid. Reference-image tokens (first coordinate ≥ 1, as FLUX.1 Kontext appends them)
    may follow the generated ones (first coordinate 0): the grid is the generated tokens'."""
    if img_ids is None:
        return None, "the call has no img_ids"
    ids = img_ids[0] if img_ids.ndim == 3 else img_ids
    if ids.shape[0] != image_tokens:
        return None, f"{ids.shape[0]} image ids for {image_tokens} image tokens"
    generated = ids[:, 0] == 0  # FLUX numbers the generated image 0 along the first axis, references from 1
    count = int(generated.sum())
    if count == 0 or not bool(generated[:count].all()):
        return None, "reference-image tokens (ids with a first coordinate other than 0) are not all after the generated ones"
    y, x = ids[:count, 1].round().long(), ids[:count, 2].round().long()
    y, x = y - y.min(), x - x.min()
    rows, cols = int(y.max()) + 1, int(x.max()) + 1
    if rows * cols != count:
        return None, f"image ids span {rows}×{cols} cells for {count} tokens"
    expected_y = torch.arange(rows, device=y.device).repeat_interleave(cols)
    expected_x = torch.arange(cols, device=x.device).repeat(rows)
    if not (torch.equal(y, expected_y) and torch.equal(x, expected_x)):
        return None, "image ids are not in row-major order"
    return (rows, cols), ""


def watch_generated_grid(pipe, record):
    """Call record((rows, cols)) with the token grid of each pipeline call's generated image, before its
    transformer calls: the FLUX.1-layout pipelines build the position ids with
    `_prepare_latent_image_ids(batch, rows, cols, device, dtype)`, the generated image's last (Kontext
    builds the reference image's first). None (nothing wrapped) where the pipeline has no such method."""
    from ..hooks.pipeline import MethodWrap

    if not callable(getattr(pipe, "_prepare_latent_image_ids", None)):
        return None

    def make(original):
        def prepare_latent_image_ids(batch_size, height, width, *args, **kwargs):
            record((int(height), int(width)))
            return original(batch_size, height, width, *args, **kwargs)
        return prepare_latent_image_ids

    return MethodWrap(pipe, "_prepare_latent_image_ids", make)


def checked_grid(img_ids: torch.Tensor | None, image_tokens: int, grid: tuple[int, int],
                 references_trail: bool) -> tuple[int, int] | None:
    """`grid` (known before the call) if the call's image tokens are that generated grid, row-major, then
    reference tokens (first id coordinate not 0) when `references_trail`; None when the shapes rule it
    out or, eagerly, the ids disagree. Under torch.compile the ids are checked in the graph
    (`torch._assert_async`): no value leaves the graph, so there is no graph break."""
    rows, cols = grid
    count = rows * cols
    if img_ids is None or count > image_tokens or (count < image_tokens and not references_trail):
        return None
    ids = img_ids[0] if img_ids.ndim == 3 else img_ids
    if ids.shape[0] != image_tokens:
        return None
    generated = ids[:count]
    y, x = generated[:, 1] - generated[0, 1], generated[:, 2] - generated[0, 2]
    ok = ((generated[:, 0] == 0).all()
          & (y == torch.arange(rows, device=ids.device).repeat_interleave(cols).to(y.dtype)).all()
          & (x == torch.arange(cols, device=ids.device).repeat(rows).to(x.dtype)).all())
    if count < image_tokens:
        ok = ok & (ids[count:, 0] != 0).all()
    if torch.compiler.is_compiling():
        torch._assert_async(ok, "the call's image ids are not the grid its pipeline built (a direct transformer "
                                "call after a pipeline call? call the compiled transformer through the pipeline)")
        return grid
    return grid if bool(ok) else None


def double_then_single_layers(transformer) -> list[LayerInfo]:
    """Double blocks `transformer_blocks.i` → layer i, then single blocks → (double blocks) + j."""
    layers = [LayerInfo(i, f"transformer_blocks.{i}.attn", "double", block.attn.heads, head_dim(block.attn))
              for i, block in enumerate(transformer.transformer_blocks)]
    n = len(layers)
    layers += [LayerInfo(n + j, f"single_transformer_blocks.{j}.attn", "single", block.attn.heads, head_dim(block.attn))
               for j, block in enumerate(transformer.single_transformer_blocks)]
    return layers


def double_then_single_layer_of_key(key: str, transformer) -> int:
    block_list, index = key.split(".")[:2]
    return int(index) + (len(transformer.transformer_blocks) if block_list == "single_transformer_blocks" else 0)


class Flux(Family):
    name = "flux"
    transformer_classes = ("FluxTransformer2DModel",)
    stock_processors = ("FluxAttnProcessor",)
    ip_adapter_processors = ("FluxIPAdapterAttnProcessor",)
    guided_pipelines = ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline", "FluxKontextPipeline")
    controlnet_pipelines = ("FluxControlNetPipeline", "FluxControlNetImg2ImgPipeline", "FluxControlNetInpaintPipeline")
    rows = CallRows(
        call_args=("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance"),
        block_stream_args=("hidden_states", "encoder_hidden_states", "x"),  # "x": norm_out's input
        block_call_args=("temb", "conditioning_embedding"),  # per-row inputs of blocks and of norm_out
        controlnet_args=("controlnet_block_samples", "controlnet_single_block_samples"),
        block_kwargs_args=("joint_attention_kwargs.ip_hidden_states",),
    )
    text_first = True
    rotary = True
    nag = True
    negative_embeds_extra = "pooled"
    nag_end_of_pipeline = {"FluxKontextPipeline": 0.25}  # the official Kontext NAG pipeline's: an edit's first quarter
    packs_latents = True
    reference_tokens_trail = True  # Kontext appends the reference image's tokens and keeps the leading ones

    def layers(self, transformer) -> list[LayerInfo]:
        return double_then_single_layers(transformer)

    def layer_of_key(self, key: str, transformer) -> int:
        return double_then_single_layer_of_key(key, transformer)

    def processor_for(self, key: str, layer: int, state):
        from ..processors.flux import FluxAttnProcessor

        return FluxAttnProcessor(layer, state)

    def fork_points(self, transformer):
        blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
        return [(block, i) for i, block in enumerate(blocks)] + [(transformer.norm_out, len(blocks))]

    def grid(self, transformer, call: dict):
        return grid_from_ids(call.get("img_ids"), call["hidden_states"].shape[1])

    def watch_grid(self, pipe, record):
        return watch_generated_grid(pipe, record)

    def known_grid(self, transformer, call: dict, grid: tuple[int, int]):
        """The grid the pipeline built for this call, if the call's ids are that grid (`checked_grid`)."""
        return checked_grid(call.get("img_ids"), call["hidden_states"].shape[1], grid, self.reference_tokens_trail)

    def conditional_rows(self, pipe, batch: int, call: dict, context: str | None):
        """Guidance-distilled FLUX makes one call a step; true CFG makes two, the negative one under
        cache context "uncond" (left stock)."""
        if context == "uncond":
            return None
        return range(batch)

    def encode_prompts(self, pipe, prompts, max_sequence_length):
        embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, num_images_per_prompt=1,
                                               max_sequence_length=max_sequence_length or 512)
        return embeds, pooled

    def encode_image_latents(self, pipe, pixels):
        return encode_kl(pipe.vae, pixels)

    def decode_image_latents(self, pipe, latents):
        return decode_kl(pipe.vae, latents)

    def latent_patch(self, transformer) -> int:
        return 2

    def predict(self, transformer, x_t, embeds, pooled, t, latent_hw, guidance=1.0):
        device, dtype = transformer.device, transformer.dtype
        guide = torch.full((x_t.shape[0],), float(guidance), device=device, dtype=dtype) \
            if transformer.config.guidance_embeds else None
        return transformer(hidden_states=x_t.to(device, dtype), encoder_hidden_states=embeds.to(device, dtype),
                           pooled_projections=pooled.to(device, dtype), timestep=t.to(device, dtype),
                           img_ids=image_ids(*latent_hw).to(device, dtype),
                           txt_ids=torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype), guidance=guide).sample

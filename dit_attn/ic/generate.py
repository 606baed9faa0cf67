"""Set generation: one caption, one canvas, its panels — optionally with reference panels kept fixed."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from ..limits import check_call
from ..loading import call_defaults
from .canvas import compose, split
from .captions import caption as make_caption
from .latents import LatentGrid, encode, image_tensor, latent_grid
from .latents import decode as decode_latents
from .layout import Layout

MODES = ("overwrite", "fill")
DECODES = ("canvas", "panels")


@dataclass
class SetResult:
    """A generated set: the canvas (first image of the call), its panels in row-major order, and the settings."""

    canvas: Image.Image
    panels: list[Image.Image]
    caption: str
    layout: Layout
    settings: dict = field(default_factory=dict)
    images: list[Image.Image] = field(default_factory=list)  # every canvas of the call (num_images_per_prompt)


def _is_fill(pipe) -> bool:
    try:
        from diffusers import FluxFillPipeline
    except ImportError:  # pragma: no cover - older diffusers
        return False
    return isinstance(pipe, FluxFillPipeline)


def _size(pipe, layout: Layout, size) -> tuple[int, int]:
    if size is None:  # each panel at the pipeline's default size
        side = int(pipe.default_sample_size * pipe.vae_scale_factor)
        return layout.rows * side, layout.cols * side
    if isinstance(size, int) and not isinstance(size, bool):
        return size, size
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return int(size[0]), int(size[1])
    raise TypeError(f"size must be (height, width) in pixels, an int (square) or None, got {size!r}")


def _references(reference, layout: Layout) -> dict[int, object]:
    if reference is None:
        return {}
    if not isinstance(reference, Mapping):
        raise TypeError("reference must be a dict {panel index: image}, e.g. {0: Image.open('left.png')}")
    for k in reference:
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < layout.panels:
            raise ValueError(f"reference panel {k!r} is not a panel of the {layout} layout: valid 0-{layout.panels - 1}")
    if len(reference) == layout.panels:
        raise ValueError(f"every panel of the {layout} layout is a reference: leave at least one panel to generate")
    return dict(sorted(reference.items()))


def reference_latents(pipe, grid: LatentGrid, reference: Mapping[int, object]) -> torch.Tensor:
    """The reference panels encoded by the VAE and placed on the canvas's latent grid, in the layout of the
    pipeline's denoising loop (1, ...); zero elsewhere."""
    h, w = grid.latent_hw
    ph, pw = grid.height // grid.layout.rows, grid.width // grid.layout.cols
    x0 = torch.zeros(1, grid.channels, h, w)
    lh, lw = h // grid.layout.rows, w // grid.layout.cols
    for k, image in reference.items():
        r, c = grid.layout.position(k)
        x0[..., r * lh:(r + 1) * lh, c * lw:(c + 1) * lw] = encode(pipe, image_tensor(image, ph, pw)).float().cpu()
    return grid.to_steps(grid.to_pipeline(x0))


class Overwrite:
    """`callback_on_step_end` that puts the reference panels back after every scheduler step:
    latents = (1 − σ)·x0 + σ·noise on the reference panels, σ the noise level the step reached
    (the scheduler's next sigma; 0 after the last step), with the run's fixed noise."""

    def __init__(self, x0: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor, then=None):
        self.x0, self.noise, self.mask, self.then = x0, noise, mask, then

    def noised(self, sigma: float) -> torch.Tensor:
        return (1 - sigma) * self.x0 + sigma * self.noise

    def __call__(self, pipe, step: int, timestep, kwargs: dict) -> dict:
        scheduler = pipe.scheduler
        sigma = float(scheduler.sigmas[scheduler.step_index])
        latents = kwargs["latents"]
        target = self.noised(sigma).to(device=latents.device, dtype=latents.dtype)
        kwargs["latents"] = torch.where(self.mask.to(latents.device), target, latents)
        if self.then is not None:
            out = self.then(pipe, step, timestep, kwargs)
            kwargs.update(out or {})
        return kwargs


def decode_panels(pipe, grid: LatentGrid, latents: torch.Tensor) -> list[Image.Image]:
    """Canvases from the pipeline's final latents, each panel decoded by the VAE on its own."""
    latents = grid.from_output(pipe, latents)
    h, w = grid.latent_hw
    lh, lw = h // grid.layout.rows, w // grid.layout.cols
    canvases = []
    for row in latents:
        panels = []
        for k in range(grid.layout.panels):
            r, c = grid.layout.position(k)
            x = decode_latents(pipe, row[None, :, r * lh:(r + 1) * lh, c * lw:(c + 1) * lw])[0]
            array = (x.permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
            panels.append(Image.fromarray(array))
        canvases.append(compose(panels, grid.layout))
    return canvases


def generate_set(pipe, caption_or_panels: str | Sequence[str], layout: Layout | str | tuple[int, int] = (1, 2),
                 size: tuple[int, int] | int | None = None, reference: Mapping[int, object] | None = None,
                 mode: str = "overwrite", *, seed: int = 0, generator: torch.Generator | None = None,
                 task_tag: str | None = None, summary: str | None = None, tags: Sequence[str] | None = None,
                 decode: str = "canvas", **kwargs) -> SetResult:
    """Generate a set of panels as one canvas with one joint caption (In-Context LoRA inference).

    `caption_or_panels`: the full caption, or one caption a panel (joined by :func:`dit_attn.ic.caption`
    with `task_tag`, `summary`, `tags`). `size`: canvas (height, width) in pixels, which must
    split into whole transformer tokens per panel (default: each panel at the pipeline's default
    size). `reference`: {panel index: panel-sized PIL image} panels to keep.

    mode="overwrite" (SD3 / SD3.5 / FLUX.1 / FLUX.2 / Qwen-Image text-to-image pipelines): after every step the reference
    panels' latents become the reference's VAE latents noised to the step's next noise level,
    (1 − σ)·x0 + σ·n with one noise n per run (the initial latents; σ₀ = 1), so the last step
    leaves them at x0 exactly. mode="fill" (a `FluxFillPipeline`): the references are painted
    on the canvas and a mask over the other panels is generated.

    decode="canvas" decodes the whole canvas as the pipeline does (the VAE decoder's GroupNorm
    statistics are global, so every panel's pixels depend a little on the others); "panels" decodes
    each panel's latents on its own, so a reference panel comes out exactly as the VAE round trip
    of the reference.

    Other keyword arguments go to the pipeline call on top of `da.call_defaults(pipe)` (e.g.
    num_inference_steps, guidance_scale); a `callback_on_step_end` of yours runs after the
    overwrite. Returns a :class:`SetResult` (canvas, panels, caption, settings).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if decode not in DECODES:
        raise ValueError(f"decode must be one of {DECODES}, got {decode!r}")
    layout = Layout.parse(layout)
    if isinstance(caption_or_panels, str):
        text = caption_or_panels
    else:
        text = make_caption(list(caption_or_panels), layout, task_tag=task_tag, summary=summary, tags=tags)
    height, width = _size(pipe, layout, size)
    grid = latent_grid(pipe, layout, height, width)  # whole tokens per panel (no allocation)
    check_call(pipe, height=height, width=width, num_inference_steps=kwargs.get("num_inference_steps"),
               guidance_scale=kwargs.get("guidance_scale"))  # the model's and the machine's limits, before the noise
    references = _references(reference, layout)
    fill = _is_fill(pipe)
    if mode == "fill" and not fill:
        raise TypeError(f"mode='fill' needs a FluxFillPipeline (e.g. FLUX.1-Fill-dev), got {type(pipe).__name__}; "
                        "use mode='overwrite' with SD3 / FLUX text-to-image pipelines")
    if mode == "overwrite" and fill:
        raise TypeError("a FluxFillPipeline generates sets with mode='fill'")
    for key in ("latents", "height", "width", "prompt", "output_type"):
        if key in kwargs:
            raise TypeError(f"generate_set sets {key!r} itself; give the canvas size as size=(height, width)")
    batch = int(kwargs.get("num_images_per_prompt", 1) or 1)
    generator = generator if generator is not None else torch.Generator().manual_seed(seed)
    device = pipe._execution_device if hasattr(pipe, "_execution_device") else pipe.transformer.device
    noise = torch.randn(grid.shape(batch), generator=generator).to(device=device, dtype=pipe.transformer.dtype)
    call = {**call_defaults(pipe), **kwargs}
    if mode == "fill":
        panel_h, panel_w = height // layout.rows, width // layout.cols
        gray = Image.new("RGB", (panel_w, panel_h), (128, 128, 128))
        black, white = Image.new("L", (panel_w, panel_h), 0), Image.new("L", (panel_w, panel_h), 255)
        for k, image in references.items():
            image_tensor(image, panel_h, panel_w)  # checks the size
        call["image"] = compose([references.get(k, gray).convert("RGB") for k in range(layout.panels)], layout)
        call["mask_image"] = compose([black if k in references else white for k in range(layout.panels)], layout)
    elif references:
        x0 = reference_latents(pipe, grid, references).to(device)
        overwrite = Overwrite(x0, grid.to_steps(noise), grid.panel_mask(references), call.pop("callback_on_step_end", None))
        inputs = list(call.pop("callback_on_step_end_tensor_inputs", None) or [])
        call["callback_on_step_end"] = overwrite
        call["callback_on_step_end_tensor_inputs"] = ["latents"] + [k for k in inputs if k != "latents"]
    output_type = "pil" if decode == "canvas" else "latent"
    images = pipe(prompt=text, height=height, width=width, latents=noise, generator=generator, output_type=output_type, **call).images
    if decode == "panels":
        images = decode_panels(pipe, grid, images)
    settings = {"caption": text, "layout": str(layout), "height": height, "width": width, "mode": mode, "seed": seed,
                "reference_panels": list(references), "decode": decode, "pipeline": type(pipe).__name__,
                **{k: v for k, v in call.items() if isinstance(v, (int, float, str, bool)) and k not in ("image", "mask_image")}}
    return SetResult(images[0], split(images[0], layout), text, layout, settings, list(images))

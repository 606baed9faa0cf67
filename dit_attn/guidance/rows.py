"""Which rows of a transformer call hold the conditional prompt, per pipeline family."""
from __future__ import annotations

import torch

SD3_PIPELINES = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline")
FLUX_PIPELINES = ("FluxPipeline", "FluxImg2ImgPipeline")
GUIDED_PIPELINES = SD3_PIPELINES + FLUX_PIPELINES


def check_guided_pipeline(pipe) -> None:
    name = type(pipe).__name__
    if name not in GUIDED_PIPELINES:
        raise TypeError(f"HeadGuidance does not support {name}; supported pipelines: {', '.join(GUIDED_PIPELINES)}")


def conditional_rows(pipe, batch: int, call_kwargs: dict, context: str | None) -> torch.Tensor | None:
    """Indices of the conditional rows of this call, or None when the call is not one to guide.

    SD3 batches CFG as [uncond..., cond...] in one call and runs skip-layer guidance as a
    separate call (left stock). FLUX runs true CFG as two calls in cache contexts
    "cond" and "uncond"; only the conditional one is guided.
    """
    name = type(pipe).__name__
    if name in SD3_PIPELINES:
        if call_kwargs.get("skip_layers") is not None:
            return None
        if pipe.do_classifier_free_guidance:
            return torch.arange(batch // 2, batch)
        return torch.arange(batch)
    if context == "uncond":
        return None
    return torch.arange(batch)

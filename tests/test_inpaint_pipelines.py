"""HeadGuidance and TextPatch in the stock inpaint pipelines of FLUX.1, Chroma, Qwen-Image, Z-Image and
FLUX.2 Klein, built from the families' toy pipelines: the guided step equals the pipeline's own CFG
arithmetic (replayed from the recorded stock calls) plus s·(ε_c − ε_p), with ε_p from an SDPA-level
perturbation; calls per step are stock, and after `remove()` the run is stock again."""
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

import dit_attn as da
from dit_attn.toy.chroma import build_chroma_pipeline
from dit_attn.toy.configs import build_flux_pipeline
from dit_attn.toy.flux2 import build_flux2_klein_pipeline
from dit_attn.toy.qwen_image import build_qwen_image_pipeline
from dit_attn.toy.z_image import build_z_image_pipeline

from .conftest import CallRecorder, PerturbSDPA, flux_attention_module, replay

LAYER, HEADS, SCALE = 1, [1, 3], 2.0
PROMPT, NEGATIVE = "a red circle", "blue"


def double_stream_module(pipe, layer):
    return pipe.transformer.transformer_blocks[layer].attn


def single_stream_module(pipe, layer):
    return pipe.transformer.layers[layer].attention


@dataclass(frozen=True)
class Case:
    pipeline: str
    build: Callable
    module: Callable  # (pipe, layer) -> the attention module of that layer
    cfg_on: dict  # call arguments that turn the pipeline's CFG on
    cfg_off: dict
    extra: dict = field(default_factory=dict)
    batched_cfg: bool = False  # one call [cond ; negative] (Z-Image) instead of a second call
    norm_rescale: bool = False  # Qwen-Image rescales the CFG prediction to the conditional one's norm


CASES = {
    "flux": Case(
        "FluxInpaintPipeline", lambda: build_flux_pipeline(num_layers=2, num_single_layers=2, num_heads=4, head_dim=8),
        flux_attention_module, dict(true_cfg_scale=3.0, negative_prompt=NEGATIVE), dict(true_cfg_scale=1.0),
        extra=dict(guidance_scale=3.5, max_sequence_length=8)),
    "chroma": Case(
        "ChromaInpaintPipeline", lambda: build_chroma_pipeline(num_layers=2, num_single_layers=2, num_heads=4, head_dim=8),
        flux_attention_module, dict(guidance_scale=3.0, negative_prompt=NEGATIVE), dict(guidance_scale=1.0),
        extra=dict(max_sequence_length=8)),
    "qwen_image": Case(
        "QwenImageInpaintPipeline", lambda: build_qwen_image_pipeline(num_layers=2, num_heads=4, head_dim=16),
        double_stream_module, dict(true_cfg_scale=3.0, negative_prompt=NEGATIVE), dict(true_cfg_scale=1.0),
        extra=dict(max_sequence_length=16), norm_rescale=True),
    "z_image": Case(
        "ZImageInpaintPipeline", lambda: build_z_image_pipeline(num_layers=2, num_heads=4, head_dim=8),
        single_stream_module, dict(guidance_scale=3.0, negative_prompt=NEGATIVE), dict(guidance_scale=0.0),
        extra=dict(max_sequence_length=64), batched_cfg=True),
    "flux2_klein": Case(
        "Flux2KleinInpaintPipeline", lambda: build_flux2_klein_pipeline(num_layers=2, num_single_layers=2, num_heads=4),
        flux_attention_module, dict(guidance_scale=3.0), dict(guidance_scale=1.0),  # its negative prompt is ""
        extra=dict(max_sequence_length=16)),
}

_PIPES: dict = {}


def inpaint_pipe(name):
    if name not in _PIPES:
        import inspect

        import diffusers

        case = CASES[name]
        base = case.build()
        cls = getattr(diffusers, case.pipeline)
        accepted = set(inspect.signature(cls.__init__).parameters)
        pipe = cls(**{k: v for k, v in base.components.items() if k in accepted})
        if name == "chroma":  # ChromaInpaintPipeline reads `guidance_embeds`, which Chroma's config lacks
            pipe.transformer.register_to_config(guidance_embeds=False)
        pipe.set_progress_bar_config(disable=True)
        _PIPES[name] = pipe
    return _PIPES[name]


IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
MASK = Image.fromarray(np.where(np.arange(32)[None, :].repeat(32, 0) < 16, 255, 0).astype(np.uint8))


def inpaint(name, cfg: bool, prompt=PROMPT):
    case = CASES[name]
    args = dict(image=IMAGE, mask_image=MASK, strength=0.6, height=32, width=32, num_inference_steps=3,
                output_type="latent", generator=torch.Generator().manual_seed(0), **case.extra)
    args.update(case.cfg_on if cfg else case.cfg_off)
    return inpaint_pipe(name)(prompt, **args).images


def pipeline_scale(case: Case) -> float:
    return case.cfg_on.get("true_cfg_scale", case.cfg_on.get("guidance_scale"))


def z_image_prediction(pipe, call, rows=None) -> torch.Tensor:
    """Z-Image's pipelines stack the output list in float32, drop the frame axis and negate it."""
    kwargs = dict(call)
    if rows is not None:
        kwargs.update(x=[call["x"][i] for i in rows], cap_feats=[call["cap_feats"][i] for i in rows], t=call["t"][rows])
    with torch.no_grad():
        out = pipe.transformer(**kwargs, return_dict=False)[0]
    return -torch.stack([o.float() for o in out]).squeeze(2)


def explicit_eps(name, pipe, calls: list[dict], cfg: bool, generated: int) -> torch.Tensor:
    """ε of one step from its stock calls: the pipeline's CFG combination, then + s·(ε_c − ε_p)."""
    case = CASES[name]
    module = case.module(pipe, LAYER)
    if case.batched_cfg:
        rows = len(calls[0]["x"]) // (2 if cfg else 1)
        everything = z_image_prediction(pipe, calls[0])
        eps_c, eps_u = everything[:rows], everything[rows:]
        with PerturbSDPA(module, HEADS):
            eps_p = z_image_prediction(pipe, calls[0], torch.arange(rows))
    else:
        eps_c = replay(pipe.transformer, calls[0])
        eps_u = replay(pipe.transformer, calls[1]) if cfg else None
        with PerturbSDPA(module, HEADS):
            eps_p = replay(pipe.transformer, calls[0])
    eps_c, eps_p = eps_c[:, :generated], eps_p[:, :generated]  # Klein keeps the generated tokens
    assert (eps_c - eps_p).abs().max() > 1e-4
    base = eps_c
    if cfg:
        eps_u, g = eps_u[:, :generated], pipeline_scale(case)
        base = (eps_c + g * (eps_c - eps_u)) if case.batched_cfg else (eps_u + g * (eps_c - eps_u))
        if case.norm_rescale:
            base = base * (eps_c.norm(dim=-1, keepdim=True) / base.norm(dim=-1, keepdim=True))
    return base + SCALE * (eps_c - eps_p)


@pytest.mark.parametrize("cfg", [False, True], ids=["no_cfg", "cfg"])
@pytest.mark.parametrize("name", list(CASES))
def test_guided_step_equals_the_explicit_computation(name, cfg):
    pipe = inpaint_pipe(name)
    with CallRecorder(pipe) as stock:
        stock_out = inpaint(name, cfg)
    edit = da.HeadGuidance(heads=[(LAYER, h) for h in HEADS], scale=SCALE, u=1.0)
    with CallRecorder(pipe) as rec, da.apply(pipe, edit):
        inpaint(name, cfg)
    per_step = 1 if CASES[name].batched_cfg or not cfg else 2
    assert len(rec.steps) == len(stock.steps) >= 2
    assert len(rec.calls) == len(stock.calls) == per_step * len(rec.steps)
    for step, eps in enumerate(rec.steps):
        want = explicit_eps(name, pipe, rec.calls[per_step * step: per_step * (step + 1)], cfg, eps.shape[1])
        assert eps.shape == want.shape
        assert (eps - want).abs().max() < 1e-5
    assert torch.equal(inpaint(name, cfg), stock_out)  # after remove(): bit-exact stock


@pytest.mark.parametrize("name", list(CASES))
def test_text_patch_with_the_prompt_itself_changes_nothing(name):
    stock = inpaint(name, cfg=True)
    with da.apply(inpaint_pipe(name), da.TextPatch(layers=[0, 1], source_prompt=PROMPT)):
        same = inpaint(name, cfg=True)
    with da.apply(inpaint_pipe(name), da.TextPatch(layers=[0, 1], source_prompt="a green square on grass")):
        other = inpaint(name, cfg=True)
    assert (same - stock).abs().max() < 1e-5
    assert (other - stock).abs().max() > 1e-4


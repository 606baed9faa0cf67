"""LocalAttention on calls whose reference-image tokens follow the generated ones: FLUX.1 Kontext,
FLUX.2 with reference images, Qwen-Image-Edit.

The generated image's queries see the generated keys inside their circle on the generated grid, every
text key and every reference key; text and reference queries see everything. The reference is the
stock model with that dense mask handed to SDPA inside the local layer, built here from the call's
own position ids (FLUX) or image shapes (Qwen-Image-Edit).
"""
import pytest
import torch
import torch.nn.functional as F
from diffusers import FluxKontextPipeline
from PIL import Image
from torch.overrides import TorchFunctionMode

import dit_attn as da
from dit_attn.kernels import AttentionPlan, LocalWindow, choose_backend

from .conftest import CallRecorder, flux_attention_module, replay

RADIUS = 2.5


@pytest.fixture(scope="module")
def kontext():
    from dit_attn.toy.configs import build_flux_pipeline

    flux = build_flux_pipeline(num_layers=2, num_single_layers=2, num_heads=2, head_dim=16)
    pipe = FluxKontextPipeline(**{k: v for k, v in flux.components.items() if k in (
        "transformer", "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")})
    pipe.set_progress_bar_config(disable=True)
    # a 48×32 image from a 32×32 reference: 12×8 and 8×8 token grids
    kwargs = dict(prompt="make it red", image=Image.new("RGB", (32, 32), (30, 160, 40)), guidance_scale=3.5,
                  height=48, width=32, max_sequence_length=8, output_type="latent", max_area=48 * 32, _auto_resize=False)
    with CallRecorder(pipe) as rec:
        pipe(num_inference_steps=1, generator=torch.Generator().manual_seed(0), **kwargs)
    return pipe, rec.calls[0], kwargs


def window_mask(text: int, generated: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, radius: float) -> torch.Tensor:
    """(S, S) keep-mask over [text ; image tokens]: a pair of generated tokens is kept inside the circle."""
    assert generated.any() and not generated.all()  # the call has both kinds of tokens
    seq = text + generated.shape[0]
    ys, xs = ys.float(), xs.float()
    in_circle = (ys[:, None] - ys[None, :]) ** 2 + (xs[:, None] - xs[None, :]) ** 2 < radius**2
    keep = torch.ones(seq, seq, dtype=torch.bool)
    both_generated = generated[:, None] & generated[None, :]
    keep[text:, text:] = ~both_generated | in_circle
    return keep


def kontext_mask(call, radius: float) -> torch.Tensor:
    """The keep-mask of a FLUX call from its position ids: the generated tokens have first coordinate 0."""
    txt_ids, ids = call["txt_ids"], call["img_ids"]
    txt_ids, ids = (txt_ids[0], ids[0]) if ids.ndim == 3 else (txt_ids, ids)
    return window_mask(txt_ids.shape[0], ids[:, 0] == 0, ids[:, 1], ids[:, 2], radius)


def qwen_edit_mask(call, radius: float) -> torch.Tensor:
    """The keep-mask of a Qwen-Image call from its img_shapes: the first image (row-major) is the generated one."""
    shapes = call["img_shapes"][0]
    _, rows, cols = shapes[0]
    total = sum(f * h * w for f, h, w in shapes)
    position = torch.arange(total)
    return window_mask(call["encoder_hidden_states"].shape[1], position < rows * cols,
                       position // cols, position % cols, radius)


class MaskedSDPA(TorchFunctionMode):
    """Every SDPA call inside `module` runs with the keep-mask `mask`."""

    def __init__(self, module, mask):
        super().__init__()
        self.mask, self.inside = mask, False
        self.handles = [module.register_forward_pre_hook(lambda *a: setattr(self, "inside", True)),
                        module.register_forward_hook(lambda *a: setattr(self, "inside", False))]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is F.scaled_dot_product_attention and self.inside:
            own = kwargs.get("attn_mask")  # a padded prompt's key mask stays
            kwargs["attn_mask"] = self.mask if own is None else own & self.mask
        return func(*args, **kwargs)

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return super().__exit__(*exc)


@pytest.mark.parametrize("layer", [1, 3])  # a double block and a single block
def test_reference_tiled_and_flex_equal_the_dense_mask(kontext, layer, monkeypatch):
    monkeypatch.setenv("DIT_ATTN_FLEX_COMPILE", "0")  # eager flex: compiling it on the CPU takes longer than the test
    pipe, call, _ = kontext
    transformer = pipe.transformer
    stock = replay(transformer, call)
    with MaskedSDPA(flux_attention_module(pipe, layer), kontext_mask(call, RADIUS)):
        want = replay(transformer, call)
    assert (want - stock).abs().max() > 1e-4  # the window cuts keys
    for backend in ("reference", "tiled", "flex"):
        with da.apply(transformer, da.LocalAttention(radius=RADIUS, layers=[layer], backend=backend)):
            got = replay(transformer, call)
        assert (got - want).abs().max() < 1e-5, backend


def test_a_radius_covering_the_generated_grid_is_stock(kontext):
    pipe, call, _ = kontext
    stock = replay(pipe.transformer, call)
    with da.apply(pipe.transformer, da.LocalAttention(radius=14.0, backend="tiled")):  # 11² + 7² < 14²: the 12×8 grid fits
        assert (replay(pipe.transformer, call) - stock).abs().max() < 1e-5


def test_downsampled_keys_pool_the_generated_grid_only(kontext):
    pipe, call, _ = kontext
    edit = dict(radius=1.5, layers=[0, 2], downsample=2)
    with da.apply(pipe.transformer, da.LocalAttention(backend="reference", **edit)):
        reference = replay(pipe.transformer, call)
    with da.apply(pipe.transformer, da.LocalAttention(backend="tiled", **edit)):
        assert (replay(pipe.transformer, call) - reference).abs().max() < 1e-5


def test_triton_declines_a_grid_with_tokens_after_it():
    q = torch.zeros(1, 2, 10, 16)
    plan = AttentionPlan((), (2, 8), LocalWindow(1.5, (2, 3)))
    with pytest.raises(ValueError, match="reference-image tokens follow it"):
        choose_backend(q, plan, "triton")
    assert choose_backend(q, plan).name == "tiled"


def test_reference_tokens_before_the_generated_ones_are_refused_clearly(kontext):
    pipe, call, _ = kontext
    ids = call["img_ids"]
    swapped = dict(call, img_ids=torch.cat([ids[ids[:, 0] != 0], ids[ids[:, 0] == 0]]))
    with da.apply(pipe.transformer, da.LocalAttention(radius=RADIUS, layers=[1])):
        with pytest.raises(ValueError, match="are not all after the generated ones"):
            replay(pipe.transformer, swapped)


@pytest.fixture(scope="module")
def flux2():
    """Flux2Pipeline with a 64×64 reference image: [8 text ; 6×4 generated ; 8×8 reference] tokens."""
    import numpy as np

    from dit_attn.toy.flux2 import build_flux2_pipeline, flux2_prompt_embeds

    pipe = build_flux2_pipeline(num_layers=2, num_single_layers=2, num_heads=2)
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    kwargs = dict(prompt_embeds=flux2_prompt_embeds(1, 8), image=image, height=48, width=32, guidance_scale=2.5,
                  output_type="latent")
    with CallRecorder(pipe) as rec:
        pipe(num_inference_steps=1, generator=torch.Generator().manual_seed(0), **kwargs)
    return pipe, rec.calls[0], kwargs


@pytest.fixture(scope="module")
def qwen_edit():
    """QwenImageEditPipeline (text states passed in) on a 48×32 image from a 32×32 reference: [6 text ;
    6×4 generated ; 4×4 reference] tokens (the pipeline's 1024² reference area shrunk to 32²)."""
    from diffusers import QwenImageEditPipeline
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit_module

    from dit_attn.toy.qwen_image import build_qwen_image_pipeline

    parts = build_qwen_image_pipeline(num_layers=3, num_heads=2, head_dim=16, text_encoder=False).components
    pipe = QwenImageEditPipeline(**{k: parts[k] for k in ("scheduler", "vae", "transformer")},
                                 text_encoder=None, tokenizer=None, processor=None)
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray((torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(2)) * 255).byte().numpy())
    texts = torch.randn(1, 6, 16, generator=torch.Generator().manual_seed(3))
    kwargs = dict(image=image, prompt_embeds=texts, height=48, width=32, true_cfg_scale=1.0, output_type="latent")
    original = edit_module.calculate_dimensions
    with pytest.MonkeyPatch.context() as patch:  # for the module's tests
        patch.setattr(edit_module, "calculate_dimensions", lambda area, ratio: original(32 * 32, ratio))
        with CallRecorder(pipe) as rec:
            pipe(num_inference_steps=1, generator=torch.Generator().manual_seed(0), **kwargs)
        yield pipe, rec.calls[0], kwargs


def qwen_attention_module(pipe, layer):
    return pipe.transformer.transformer_blocks[layer].attn


@pytest.mark.parametrize("layer", [1, 3])  # a double block and a single block
def test_flux2_reference_tiled_and_flex_equal_the_dense_mask(flux2, layer, monkeypatch):
    monkeypatch.setenv("DIT_ATTN_FLEX_COMPILE", "0")
    pipe, call, _ = flux2
    transformer = pipe.transformer
    stock = replay(transformer, call)
    with MaskedSDPA(flux_attention_module(pipe, layer), kontext_mask(call, RADIUS)):
        want = replay(transformer, call)
    assert (want - stock).abs().max() > 1e-4
    for backend in ("reference", "tiled", "flex"):
        with da.apply(transformer, da.LocalAttention(radius=RADIUS, layers=[layer], backend=backend)):
            got = replay(transformer, call)
        assert (got - want).abs().max() < 1e-5, backend


@pytest.mark.parametrize("layer", [0, 2])
def test_qwen_edit_reference_tiled_and_flex_equal_the_dense_mask(qwen_edit, layer, monkeypatch):
    monkeypatch.setenv("DIT_ATTN_FLEX_COMPILE", "0")
    pipe, call, _ = qwen_edit
    assert call["img_shapes"][0] == [(1, 6, 4), (1, 4, 4)]
    transformer = pipe.transformer
    stock = replay(transformer, call)
    with MaskedSDPA(qwen_attention_module(pipe, layer), qwen_edit_mask(call, RADIUS)):
        want = replay(transformer, call)
    assert (want - stock).abs().max() > 1e-4
    for backend in ("reference", "tiled", "flex"):
        with da.apply(transformer, da.LocalAttention(radius=RADIUS, layers=[layer], backend=backend)):
            got = replay(transformer, call)
        assert (got - want).abs().max() < 1e-5, backend


@pytest.mark.parametrize("model", ["flux2", "qwen_edit"])
def test_a_radius_covering_the_generated_grid_is_stock_with_references(model, request):
    pipe, call = request.getfixturevalue(model)[:2]
    stock = replay(pipe.transformer, call)
    with da.apply(pipe.transformer, da.LocalAttention(radius=6.0, backend="tiled")):  # 5² + 3² < 6²: the 6×4 grid fits
        assert (replay(pipe.transformer, call) - stock).abs().max() < 1e-5


def test_flux2_pipeline_with_local_attention_and_guidance_is_the_masked_stock_run(flux2):
    """Two steps of Flux2Pipeline with a reference image: LocalAttention on layer 2 equals the stock
    pipeline with the dense mask on that layer; with HeadGuidance too, as many calls as stock."""
    pipe, call, kwargs = flux2
    run = lambda: pipe(num_inference_steps=2, generator=torch.Generator().manual_seed(0), **kwargs).images  # noqa: E731
    with MaskedSDPA(flux_attention_module(pipe, 2), kontext_mask(call, RADIUS)):
        want = run()
    with da.apply(pipe, da.LocalAttention(radius=RADIUS, layers=[2])):
        assert (run() - want).abs().max() < 1e-5
    with CallRecorder(pipe) as rec, da.apply(pipe, da.LocalAttention(radius=RADIUS, layers=[2]),
                                             da.HeadGuidance(heads=["L1H0"], scale=2.0, u=1.0)):
        guided = run()
    assert len(rec.calls) == 2 and guided.shape == want.shape
    assert (guided - want).abs().max() > 1e-4


def test_qwen_edit_pipeline_with_local_attention_is_the_masked_stock_run(qwen_edit):
    """Two steps of QwenImageEditPipeline under true CFG: LocalAttention on layer 1 (both calls of a step)
    equals the stock pipeline with the dense mask on that layer."""
    pipe, call, kwargs = qwen_edit
    kwargs = dict(kwargs, true_cfg_scale=2.0, negative_prompt_embeds=torch.zeros_like(kwargs["prompt_embeds"]))
    run = lambda: pipe(num_inference_steps=2, generator=torch.Generator().manual_seed(0), **kwargs).images  # noqa: E731
    stock = run()
    with MaskedSDPA(qwen_attention_module(pipe, 1), qwen_edit_mask(call, RADIUS)):
        want = run()
    assert (want - stock).abs().max() > 1e-4
    with da.apply(pipe, da.LocalAttention(radius=RADIUS, layers=[1])):
        assert (run() - want).abs().max() < 1e-5

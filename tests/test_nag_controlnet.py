"""NAG in diffusers' ControlNet pipelines (FLUX.1, SD3): on its token path the call keeps its rows, so the model adds
the ControlNet's residuals to each row's image stream as in a stock call. Checked against the stock ControlNet
pipeline (NAG against the prompt itself leaves it), against NAG on the base pipeline (a ControlNet with conditioning scale
0 adds nothing) and by the refusals of what cannot run there."""
import contextlib
import copy

import pytest
import torch
from diffusers import (FluxControlNetImg2ImgPipeline, FluxControlNetInpaintPipeline, FluxControlNetModel,
                       FluxControlNetPipeline, QwenImageControlNetInpaintPipeline, QwenImageControlNetModel,
                       QwenImageControlNetPipeline, SD3ControlNetModel, StableDiffusion3ControlNetInpaintingPipeline,
                       StableDiffusion3ControlNetPipeline)

import dit_attn as da
from dit_attn.toy.configs import build_flux_pipeline, build_sd3_pipeline, pipeline_components
from dit_attn.toy.qwen_image import build_qwen_image_pipeline

from .conftest import SIZE, CallRecorder, flux_call, sd3_call

PROMPT, NEGATIVE = "a red circle", "a blue square"
SETTINGS = dict(scale=4.0, tau=1.2, alpha=0.5)


def with_controlnet(pipeline_class, base, controlnet, zeroed: str, seed: int):
    """(the ControlNet pipeline on `base`'s components, base). ControlNets start with zero output projections (their
    residuals vanish): the `zeroed` modules (names, space-separated) get random weights."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in zeroed.split():
            for p in getattr(controlnet, name).parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    pipe = pipeline_class(**pipeline_components(base), controlnet=controlnet.eval())
    for p in (pipe, base):
        p.set_progress_bar_config(disable=True)
    return pipe, base


@pytest.fixture(scope="module")
def flux_controlnet():
    base = build_flux_pipeline(num_layers=2, num_single_layers=2, num_heads=4, head_dim=8)
    controlnet = FluxControlNetModel.from_transformer(base.transformer, num_layers=1, num_single_layers=1,
                                                      attention_head_dim=8, num_attention_heads=4)
    return with_controlnet(FluxControlNetPipeline, base, controlnet,
                           "controlnet_blocks controlnet_single_blocks controlnet_x_embedder", 1)


@pytest.fixture(scope="module")
def sd3_controlnet():
    base = build_sd3_pipeline(num_layers=3, num_heads=4, head_dim=8)
    controlnet = SD3ControlNetModel.from_transformer(base.transformer, num_layers=2, num_extra_conditioning_channels=0)
    return with_controlnet(StableDiffusion3ControlNetPipeline, base, controlnet, "controlnet_blocks pos_embed_input", 2)


@pytest.fixture(scope="module")
def qwen_controlnet():
    base = build_qwen_image_pipeline(num_layers=3, num_heads=4, head_dim=16)
    controlnet = QwenImageControlNetModel.from_transformer(base.transformer, num_layers=2, attention_head_dim=16,
                                                           num_attention_heads=4)
    return with_controlnet(QwenImageControlNetPipeline, base, controlnet, "controlnet_blocks controlnet_x_embedder", 5)


def qwen_call(pipe, prompt, steps=2, **kwargs):
    args = dict(prompt=prompt, num_inference_steps=steps, true_cfg_scale=1.0, max_sequence_length=16,
                output_type="latent", height=32, width=32, generator=torch.Generator().manual_seed(0))
    return pipe(**{**args, **kwargs}).images


def control_image(seed: int = 3) -> torch.Tensor:
    return torch.rand(1, 3, SIZE["height"], SIZE["width"], generator=torch.Generator().manual_seed(seed))


def latents(*shape) -> torch.Tensor:
    """The starting latents, given: a ControlNet pipeline draws the control image's latents from the generator
    first (FLUX.1) or from the global one (SD3), so its own would not be the base pipeline's."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(4))


# FLUX.1: 8×8 packed latents of 16 channels; SD3: 16 channels at half the size; Qwen-Image: 4×4 packed 2×2 patches
FLUX_LATENTS, SD3_LATENTS, QWEN_LATENTS = (2, 64, 16), (2, 16, 16, 16), (2, 16, 16)
CASES = {
    "flux": ("flux_controlnet", flux_call, {}, FLUX_LATENTS),
    "flux_true_cfg": ("flux_controlnet", flux_call, {"true_cfg_scale": 2.0, "negative_prompt": "a green cat"},
                      FLUX_LATENTS),
    "sd3": ("sd3_controlnet", sd3_call, {"guidance_scale": 1.0}, SD3_LATENTS),
    "sd3_cfg": ("sd3_controlnet", sd3_call, {"negative_prompt": "a green cat"}, SD3_LATENTS),
    "qwen_image": ("qwen_controlnet", qwen_call, {}, QWEN_LATENTS),
    "qwen_image_true_cfg": ("qwen_controlnet", qwen_call, {"true_cfg_scale": 3.0, "negative_prompt": "a green cat"},
                            QWEN_LATENTS),
}


def run(pipe, call, edit=None, scale: float = 1.0, prompt=("a red circle", "a green square"), **kwargs):
    torch.manual_seed(0)  # SD3's ControlNet pipeline samples the control image's latents from the global generator
    with CallRecorder(pipe) as rec, (da.apply(pipe, edit) if edit is not None else contextlib.nullcontext()):
        out = call(pipe, list(prompt), control_image=control_image(),
                   controlnet_conditioning_scale=scale, **kwargs)
    return out, rec


@pytest.mark.parametrize("case", CASES)
def test_nag_against_its_own_prompt_in_a_controlnet_pipeline_is_the_stock_controlnet_run(case, request):
    """With the prompt itself as the negative prompt Z⁻ = Z⁺ (the negative text runs as the positive one does), so
    NAG's token path, which carries the negative text through every block, must leave the stock ControlNet run."""
    fixture, call, kwargs, shape = CASES[case]
    pipe, _ = request.getfixturevalue(fixture)
    kwargs = {**kwargs, "latents": latents(*shape)}
    stock, stock_calls = run(pipe, call, prompt=[PROMPT] * 2, **kwargs)
    plain, _ = run(pipe, call, prompt=[PROMPT] * 2, scale=0.0, **kwargs)
    assert (stock - plain).abs().max() > 1e-3  # the ControlNet's residuals move the output
    same, calls = run(pipe, call, da.NAG(PROMPT, **SETTINGS), prompt=[PROMPT] * 2, **kwargs)
    assert len(calls.steps) == len(stock_calls.steps)  # no extra transformer call
    assert (same - stock).abs().max() <= 1e-4


@pytest.mark.parametrize("case", CASES)
def test_nag_with_a_zero_controlnet_equals_nag_on_the_base_pipeline(case, request):
    """NAG acts in the ControlNet pipeline (its output moves), and with the ControlNet at conditioning scale 0 it is
    NAG on the base pipeline, whose token path is checked against the row path and stock attention elsewhere."""
    fixture, call, kwargs, shape = CASES[case]
    pipe, base = request.getfixturevalue(fixture)
    kwargs = {**kwargs, "latents": latents(*shape)}
    nag = da.NAG(NEGATIVE, **SETTINGS)
    stock, _ = run(pipe, call, **kwargs)
    guided, _ = run(pipe, call, nag, **kwargs)
    assert (guided - stock).abs().max() > 1e-3
    without, _ = run(pipe, call, nag, scale=0.0, **kwargs)
    with da.apply(base, nag):
        reference = call(base, ["a red circle", "a green square"], **kwargs)
    assert (without - reference).abs().max() <= 1e-5
    assert (guided - without).abs().max() > 1e-3  # the residuals act under NAG


def test_edits_that_add_rows_refuse_a_controlnet_pipeline(flux_controlnet):
    pipe, _ = flux_controlnet
    with pytest.raises(TypeError, match=r"HeadGuidance does not support FluxControlNetPipeline \(of the edits .* only NAG"):
        da.apply(pipe, da.HeadGuidance(heads="L0H0"))
    with pytest.raises(TypeError, match="TextPatch does not support FluxControlNetPipeline"):
        da.apply(pipe, da.TextPatch(layers=[0], source_prompt="a blue square"))


def test_nag_row_path_refuses_controlnet_residuals_in_one_line(sd3_controlnet):
    pipe, _ = sd3_controlnet
    with pytest.raises(NotImplementedError, match=r"NAG runs with ControlNet residuals on its token path only"):
        run(pipe, sd3_call, da.NAG(NEGATIVE, layers=[1, 2]))


def check_own_prompt_is_stock_and_nag_acts(pipe, call, inputs: dict) -> None:
    """The ControlNet moves the output; NAG against the prompt itself leaves the stock run; NAG acts."""
    stock, _ = run(pipe, call, prompt=[PROMPT] * 2, **inputs)
    plain, _ = run(pipe, call, prompt=[PROMPT] * 2, scale=0.0, **inputs)
    assert (stock - plain).abs().max() > 1e-3
    same, _ = run(pipe, call, da.NAG(PROMPT, **SETTINGS), prompt=[PROMPT] * 2, **inputs)
    assert (same - stock).abs().max() <= 1e-4
    guided, _ = run(pipe, call, da.NAG(NEGATIVE, **SETTINGS), prompt=[PROMPT] * 2, **inputs)
    assert (guided - stock).abs().max() > 1e-3


@pytest.mark.parametrize("pipeline_class", [FluxControlNetImg2ImgPipeline, FluxControlNetInpaintPipeline])
def test_nag_in_flux_controlnet_image_to_image_and_inpainting(pipeline_class, flux_controlnet):
    """As in the text-to-image ControlNet pipeline: against its own prompt NAG leaves the stock run, and it acts."""
    pipe = pipeline_class(**pipeline_components(flux_controlnet[0]))
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, SIZE["height"], SIZE["width"], generator=torch.Generator().manual_seed(6))
    mask = (torch.rand(1, 1, SIZE["height"], SIZE["width"], generator=torch.Generator().manual_seed(7)) > 0.5).float()
    inputs = {"image": image, "strength": 0.8, **({"mask_image": mask} if "Inpaint" in pipeline_class.__name__ else {})}
    check_own_prompt_is_stock_and_nag_acts(pipe, flux_call, inputs)


def sd3_inpainting():
    base = build_sd3_pipeline(num_layers=3, num_heads=4, head_dim=8)
    controlnet = SD3ControlNetModel.from_transformer(base.transformer, num_layers=2, num_extra_conditioning_channels=1)
    pipe, _ = with_controlnet(StableDiffusion3ControlNetInpaintingPipeline, base, controlnet,
                              "controlnet_blocks pos_embed_input", 2)
    return pipe, sd3_call, SD3_LATENTS


def qwen_inpainting():
    base = build_qwen_image_pipeline(num_layers=3, num_heads=4, head_dim=16)
    controlnet = QwenImageControlNetModel.from_transformer(base.transformer, num_layers=2, attention_head_dim=16,
                                                           num_attention_heads=4, extra_condition_channels=4)
    pipe, _ = with_controlnet(QwenImageControlNetInpaintPipeline, base, controlnet,
                              "controlnet_blocks controlnet_x_embedder", 5)
    return pipe, qwen_call, QWEN_LATENTS


@pytest.mark.parametrize("build", [sd3_inpainting, qwen_inpainting])
def test_nag_in_controlnet_inpainting_pipelines(build):
    """The ControlNet inpainting pipelines of SD3 and Qwen-Image (their ControlNets read the mask as extra channels):
    against its own prompt NAG leaves the stock run, and it acts."""
    pipe, call, shape = build()
    mask = (torch.rand(1, 1, SIZE["height"], SIZE["width"], generator=torch.Generator().manual_seed(7)) > 0.5).float()
    inputs = {"control_mask": mask, "latents": latents(*shape), **({"guidance_scale": 1.0} if call is sd3_call else {})}
    check_own_prompt_is_stock_and_nag_acts(pipe, call, inputs)



def multi_controlnet(fixture: str, request):
    """The fixture's ControlNet pipeline with two ControlNets (its own and a copy with other random output weights) in
    diffusers' Multi-ControlNet wrapper, which sums their residuals before the transformer reads them."""
    from diffusers import FluxMultiControlNetModel, SD3MultiControlNetModel

    pipe, _ = request.getfixturevalue(fixture)
    second = copy.deepcopy(pipe.controlnet)
    generator = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for p in second.controlnet_blocks.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    wrapper = {"flux_controlnet": FluxMultiControlNetModel, "sd3_controlnet": SD3MultiControlNetModel}[fixture]
    multi = type(pipe)(**{**pipeline_components(pipe), "controlnet": wrapper([pipe.controlnet, second])})
    multi.set_progress_bar_config(disable=True)
    return multi


@pytest.mark.parametrize("case", ["flux", "sd3"])  # QwenImageMultiControlNetModel runs one ControlNet only
def test_nag_with_multi_controlnet(case, request):
    """Two ControlNets: each moves the output, NAG against its own prompt leaves the stock Multi-ControlNet run with the
    stock number of transformer calls, and NAG acts."""
    fixture, call, kwargs, shape = CASES[case]
    pipe = multi_controlnet(fixture, request)
    images = [control_image(3), control_image(9)]
    inputs = {**kwargs, "latents": latents(*shape), "control_image": images}

    def multi_run(edit=None, scales=(1.0, 1.0)):
        torch.manual_seed(0)
        with CallRecorder(pipe) as rec, (da.apply(pipe, edit) if edit is not None else contextlib.nullcontext()):
            out = call(pipe, [PROMPT] * 2, controlnet_conditioning_scale=list(scales), **inputs)
        return out, rec

    stock, stock_calls = multi_run()
    for scales in ((1.0, 0.0), (0.0, 1.0)):
        assert (stock - multi_run(scales=scales)[0]).abs().max() > 1e-3  # each ControlNet's residuals count
    same, calls = multi_run(da.NAG(PROMPT, **SETTINGS))
    assert len(calls.steps) == len(stock_calls.steps)
    assert (same - stock).abs().max() <= 1e-4
    guided, _ = multi_run(da.NAG(NEGATIVE, **SETTINGS))
    assert (guided - stock).abs().max() > 1e-3

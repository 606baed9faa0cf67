"""TextPatch / TextGuard on the families whose text keeps its own length per row (Z-Image), checked
against stock runs of the source prompt and an independent swap of SDPA's caption keys/values."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import dit_attn as da
from dit_attn.families import family_of
from dit_attn.toy.z_image import build_z_image_pipeline

from .conftest import SIZE, CallRecorder

ROUNDING = 2e-5  # rows computed in a wider batch round differently (see test_localization)
PROMPT, SOURCE = "a red circle on a white background", "a blue square"
LONG = " ".join(["a blurry dark blue square"] * 8)  # past 32 caption tokens: another caption bucket of Z-Image


@pytest.fixture(scope="module")
def z_pipe():
    pipe = build_z_image_pipeline(num_layers=3, num_refiner_layers=1, num_heads=4, head_dim=8)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def z_call(pipe, prompt=PROMPT, steps=2, **kwargs):
    args = dict(num_inference_steps=steps, guidance_scale=0.0, output_type="latent",
                generator=torch.Generator().manual_seed(0), **SIZE)
    return pipe(prompt, **{**args, **kwargs}).images


@pytest.mark.parametrize("cfg", [0.0, 3.0])
def test_z_image_patch_with_own_prompt_changes_nothing(z_pipe, cfg):
    kwargs = dict(guidance_scale=cfg, negative_prompt=LONG if cfg else None, num_images_per_prompt=2)
    stock = z_call(z_pipe, **kwargs)
    with da.apply(z_pipe, da.TextPatch(layers=[0, 2], source_prompt=PROMPT)):
        assert (z_call(z_pipe, **kwargs) - stock).abs().max() <= ROUNDING


@pytest.mark.parametrize("prompt,source,cfg", [(PROMPT, SOURCE, 0.0), (PROMPT, LONG, 0.0), (LONG, SOURCE, 3.0)])
def test_z_image_patch_everywhere_equals_a_run_of_the_source(z_pipe, prompt, source, cfg):
    """A source of another caption length, in the same 32-token bucket or not (the image keeps the
    source run's rotary offsets at patched layers), with CFG's negative rows left alone."""
    kwargs = dict(guidance_scale=cfg, negative_prompt="a green cat" if cfg else None)
    everywhere = list(range(len(da.layers(z_pipe))))
    with da.apply(z_pipe, da.TextPatch(layers=everywhere, source_prompt=source)):
        patched = z_call(z_pipe, prompt, **kwargs)
    if cfg:  # the stock step of [source ; negative] is the patched step of [prompt ; negative]
        want = z_call(z_pipe, source, **kwargs)
    else:
        want = z_call(z_pipe, source)
    assert (patched - want).abs().max() <= ROUNDING
    assert (patched - z_call(z_pipe, prompt, **kwargs)).abs().max() > 1e-3


class SwapCaption(TorchFunctionMode):
    """Inside one attention module, SDPA's caption keys/values (after the image segment) replaced by given ones."""

    def __init__(self, module, image_segment, keys=None, values=None):
        super().__init__()
        self.segment, self.keys, self.values, self.inside, self.seen = image_segment, keys, values, False, []
        self.handles = [module.register_forward_pre_hook(lambda *a: self._set(True)),
                        module.register_forward_hook(lambda *a: self._set(False))]

    def _set(self, value):
        self.inside = value

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and self.inside:
            named = dict(zip(("query", "key", "value"), args)) | kwargs
            k, v = named["key"], named["value"]
            self.seen.append((k.clone(), v.clone()))  # (B, H, S, D)
            if self.keys is not None:
                k, v = k.clone(), v.clone()
                k[:, :, self.segment:], v[:, :, self.segment:] = self.keys[:, :, self.segment:], self.values[:, :, self.segment:]
                named["key"], named["value"] = k, v
            return func(**named)
        return func(*args, **kwargs)

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return super().__exit__(*exc)


def test_z_image_one_layer_patch_equals_an_sdpa_swap(z_pipe):
    """Each patched step equals the stock transformer on the step's inputs whose layer-1 SDPA gets the
    caption keys/values of a stock run of the source prompt on the same latents (same caption bucket)."""
    layer, family = 1, family_of(z_pipe.transformer)
    with CallRecorder(z_pipe) as rec, da.apply(z_pipe, da.TextPatch(layers=[layer], source_prompt=SOURCE)):
        z_call(z_pipe, num_images_per_prompt=2)
    source_caption = z_pipe.encode_prompt(SOURCE, do_classifier_free_guidance=False)[0][0]
    attn = z_pipe.transformer.layers[layer].attention
    moved = 0.0
    for call, eps in zip(rec.calls, rec.steps, strict=True):
        rows = len(call["x"])
        source_call = dict(call, cap_feats=[source_caption] * rows, return_dict=False)
        with torch.no_grad(), SwapCaption(attn, 64) as source_run:
            z_pipe.transformer(**source_call)
        keys, values = source_run.seen[0]
        with torch.no_grad(), SwapCaption(attn, 64, keys, values):
            want = family.prediction(z_pipe.transformer(**dict(call, return_dict=False))[0])
        with torch.no_grad():
            stock = family.prediction(z_pipe.transformer(**dict(call, return_dict=False))[0])
        assert (eps - want).abs().max() <= ROUNDING
        moved = max(moved, float((eps - stock).abs().max()))
    assert moved > 1e-4


def test_z_image_text_guard(z_pipe):
    """A blocked word in quoted text is patched with its guarded twin: the same as TextPatch with that prompt."""
    prompt = 'a sign that says "red"'
    guard = da.TextGuard(layers=[0, 1], blocklist=["red"], replacement="blue")
    with da.apply(z_pipe, guard):
        guarded = z_call(z_pipe, prompt)
    with da.apply(z_pipe, da.TextPatch(layers=[0, 1], source_prompt='a sign that says "blue"')):
        patched = z_call(z_pipe, prompt)
    assert torch.equal(guarded, patched) and (guarded - z_call(z_pipe, prompt)).abs().max() > 1e-4


# ---------------------------------------------------------------- HunyuanImage 2.1: per-row Qwen and ByT5 masks
def _hy(**kwargs):
    from dit_attn.toy.hunyuan_image import build_hunyuan_image_pipeline

    pipe = build_hunyuan_image_pipeline(num_layers=2, num_single_layers=2, num_heads=4, head_dim=8, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def hy_guider():
    return _hy(apg_start=1)  # CFG at steps 0-1, APG at step 2


@pytest.fixture(scope="module")
def hy_distilled():
    return _hy(guidance_embeds=True, seed=1)


def hy_call(pipe, prompt, steps=3, **kwargs):
    args = dict(num_inference_steps=steps, height=32, width=32, output_type="latent",
                generator=torch.Generator().manual_seed(0))
    if pipe.transformer.config.guidance_embeds:
        args["distilled_guidance_scale"] = 3.25
    return pipe(prompt, **{**args, **kwargs}).images


QUOTED = 'a sign that says "OK"'  # glyph text: ByT5 states and their mask ride with the rows


# the guider pipeline picks its OCR guider when the prompt has glyph text: there both prompts have it or neither
@pytest.mark.parametrize("fixture,prompt,source", [("hy_guider", PROMPT, SOURCE), ("hy_guider", QUOTED, 'a sign that says "NO"'),
                                                   ("hy_distilled", PROMPT, QUOTED), ("hy_distilled", QUOTED, SOURCE)])
def test_hunyuan_image_patch_everywhere_equals_a_run_of_the_source(fixture, prompt, source, request):
    """Patching every layer gives the source prompt's run (the guider's negative call left stock), and the
    prompt itself as source changes nothing."""
    pipe = request.getfixturevalue(fixture)
    everywhere = list(range(len(da.layers(pipe))))
    with da.apply(pipe, da.TextPatch(layers=everywhere, source_prompt=source)):
        patched = hy_call(pipe, prompt)
    assert (patched - hy_call(pipe, source)).abs().max() <= ROUNDING
    stock = hy_call(pipe, prompt, num_images_per_prompt=2)
    assert (patched - stock[:1]).abs().max() > 1e-3
    with da.apply(pipe, da.TextPatch(layers=[1, 3], source_prompt=prompt)):
        assert (hy_call(pipe, prompt, num_images_per_prompt=2) - stock).abs().max() <= ROUNDING


# ---------------------------------------------------------------- Qwen-Image-Edit: prompts encoded with the image
@pytest.fixture(scope="module")
def edit_pipe():
    """The pipeline's 1024² reference area shrunk to 32² (4×4 reference tokens, 4 vision tokens in the text)."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit_module

    from dit_attn.toy.qwen_image import build_qwen_image_edit_pipeline

    original = edit_module.calculate_dimensions
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(edit_module, "calculate_dimensions", lambda area, ratio: original(32 * 32, ratio))
        pipe = build_qwen_image_edit_pipeline(num_layers=3, num_heads=4, head_dim=16)
        pipe.set_progress_bar_config(disable=True)
        yield pipe


def reference_image(seed=2):
    from PIL import Image

    return Image.fromarray((torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(seed)) * 255).byte().numpy())


def edit_call(pipe, prompt, **kwargs):
    args = dict(image=reference_image(), num_inference_steps=2, output_type="latent", true_cfg_scale=1.0,
                height=32, width=32, generator=torch.Generator().manual_seed(0))
    return pipe(prompt=prompt, **{**args, **kwargs}).images


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_qwen_image_edit_patch_with_the_reference_image(edit_pipe, cfg):
    """The source prompt is encoded with the call's reference image: patching every layer equals the edit run of
    the source prompt (shorter: padded and masked); the prompt itself changes nothing; CFG's call stays stock."""
    kwargs = dict(true_cfg_scale=cfg, negative_prompt="a cat" if cfg > 1 else None)
    stock = edit_call(edit_pipe, PROMPT, **kwargs)
    with da.apply(edit_pipe, da.TextPatch(layers=[1], source_prompt=PROMPT)):
        assert (edit_call(edit_pipe, PROMPT, **kwargs) - stock).abs().max() <= ROUNDING
    with da.apply(edit_pipe, da.TextPatch(layers=[0, 1, 2], source_prompt=SOURCE)):
        patched = edit_call(edit_pipe, PROMPT, **kwargs)
    assert (patched - edit_call(edit_pipe, SOURCE, **kwargs)).abs().max() <= ROUNDING
    assert (patched - stock).abs().max() > 1e-3
    family = family_of(edit_pipe.transformer)  # the image is part of the text states
    with torch.no_grad():
        one, _ = family.encode_prompts(edit_pipe, [SOURCE], None, image=reference_image(2))
        other, _ = family.encode_prompts(edit_pipe, [SOURCE], None, image=reference_image(3))
    assert (one - other).abs().max() > 1e-3


# ---------------------------------------------------------------- LongCat-Image, Ovis-Image, Bria: FLUX.1's processor
@pytest.fixture(scope="module", params=["longcat", "ovis", "bria"])
def clone(request):
    from .test_nag_families import flux_clone

    return request.param, *flux_clone(request.param)


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_flux_clones_patch_everywhere_equals_a_run_of_the_source(clone, cfg):
    """Each pipeline pads its prompts to one length without a mask: the source rides at the call's length.
    With CFG the unconditional rows (Bria: the first half of one call; the others: a second call) stay stock."""
    name, pipe, call = clone
    kwargs = dict(guidance_scale=cfg, negative_prompt="a green cat" if cfg > 1 else None)
    stock = call(PROMPT, num_images_per_prompt=2, **kwargs)
    with da.apply(pipe, da.TextPatch(layers=[1, 2], source_prompt=PROMPT)):
        assert (call(PROMPT, num_images_per_prompt=2, **kwargs) - stock).abs().max() <= ROUNDING
    with da.apply(pipe, da.TextPatch(layers=list(range(len(da.layers(pipe)))), source_prompt=SOURCE)):
        patched = call(PROMPT, **kwargs)
    assert (patched - call(SOURCE, **kwargs)).abs().max() <= ROUNDING
    assert (patched - stock[:1]).abs().max() > 1e-3


@pytest.mark.parametrize("fixture", ["z_pipe", "hy_distilled"])
def test_localize_and_edit_text(fixture, request):
    """localize on a family whose text keeps per-row lengths (Z-Image) or per-row masks (HunyuanImage): patching
    with the prompt itself scores SSIM 1 at every layer, another prompt less; edit_text's edited image is the
    TextPatch run of the prompt with its new text."""
    from dit_attn.localization import ssim_score

    pipe = request.getfixturevalue(fixture)
    kwargs = dict(guidance_scale=0.0) if fixture == "z_pipe" else dict(distilled_guidance_scale=3.25)
    result = da.localize(pipe, [(PROMPT, PROMPT), (PROMPT, SOURCE)], score=ssim_score, layers=[0, 1], seeds=[0],
                         num_inference_steps=2, progress=False, **SIZE, **kwargs)
    for s in result.scores:
        assert s.samples[0] == pytest.approx(1.0, abs=1e-6) and s.samples[1] < 1 - 2e-6
    edit = da.edit_text(pipe, 'a sign that says "A"', "B", layers=[0, 1], num_inference_steps=2, **SIZE, **kwargs)
    with da.apply(pipe, da.TextPatch(layers=[0, 1], source_prompt='a sign that says "B"')):
        want = pipe('a sign that says "A"', num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="pt", **SIZE, **kwargs).images
    got = torch.tensor(np.asarray(edit.edited), dtype=torch.float32).permute(2, 0, 1)[None] / 255  # a PIL image
    assert (got - want.float()).abs().max() <= 1 / 255 + 1e-6


def test_z_image_img2img_patch_everywhere_equals_a_run_of_the_source(z_pipe):
    from diffusers import ZImageImg2ImgPipeline
    from PIL import Image

    pipe = ZImageImg2ImgPipeline(**z_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    run = lambda prompt: pipe(prompt, image=image, strength=0.8, num_inference_steps=3, guidance_scale=0.0,  # noqa: E731
                              output_type="latent", generator=torch.Generator().manual_seed(0), **SIZE).images
    with da.apply(pipe, da.TextPatch(layers=list(range(len(da.layers(pipe)))), source_prompt=LONG)):
        patched = run(PROMPT)
    assert (patched - run(LONG)).abs().max() <= ROUNDING and (patched - run(PROMPT)).abs().max() > 1e-3


@pytest.mark.parametrize("fixture", ["z_pipe", "hy_distilled", "edit_pipe"])
def test_with_head_guidance_the_prompt_itself_changes_nothing(fixture, request):
    """The perturbed copies are patched from a perturbed run of their source rows: with the prompt itself as
    source the guided run is HeadGuidance's alone; another source moves it."""
    pipe = request.getfixturevalue(fixture)
    call = {"z_pipe": lambda p: z_call(pipe, p), "hy_distilled": lambda p: hy_call(pipe, p, steps=2),
            "edit_pipe": lambda p: edit_call(pipe, p)}[fixture]
    guidance = da.HeadGuidance(heads=["L1H1", "L2H0"], scale=2.0)
    with da.apply(pipe, guidance):
        want = call(PROMPT)
    with da.apply(pipe, guidance, da.TextPatch(layers=[0, 1], source_prompt=PROMPT)):
        assert (call(PROMPT) - want).abs().max() <= ROUNDING
    with da.apply(pipe, guidance, da.TextPatch(layers=[0, 1], source_prompt=SOURCE)):
        assert (call(PROMPT) - want).abs().max() > 1e-4


# ---------------------------------------------------------------- HunyuanVideo 1.5: per-row context reordering
@pytest.fixture(scope="module")
def hv_pipe():
    from dit_attn.toy.hunyuan_video15 import build_hunyuan_video15_pipeline

    pipe = build_hunyuan_video15_pipeline(num_layers=3, num_heads=4, head_dim=8, guidance_scale=4.0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def hv_call(pipe, prompt, steps=2, cfg=4.0, **kwargs):
    from dit_attn.toy.hunyuan_video15 import HUNYUAN_VIDEO15_RUN

    pipe.guider = pipe.guider.new(guidance_scale=cfg)  # 1.0: one call a step
    args = dict(num_inference_steps=steps, output_type="latent", generator=torch.Generator().manual_seed(0),
                **HUNYUAN_VIDEO15_RUN)
    return pipe(prompt=prompt, **{**args, **kwargs}).frames


HV_QUOTED = 'a sign that says "OK"'  # glyph text: its ByT5 states and mask ride with the rows


@pytest.mark.parametrize("prompt,source,cfg", [(PROMPT, SOURCE, 4.0), (PROMPT, HV_QUOTED, 1.0), (HV_QUOTED, SOURCE, 4.0)])
def test_hunyuan_video15_patch_everywhere_equals_a_run_of_the_source(hv_pipe, prompt, source, cfg):
    """Sources of other Qwen and ByT5 lengths (each row's context reordered by its own masks); the guider's
    unconditional call left stock; batch 2 (two prompts: the text-to-video pipeline's image states have a
    row per prompt, not per video)."""
    everywhere = list(range(len(da.layers(hv_pipe))))
    _, mask, _, glyph_mask = hv_pipe.encode_prompt(prompt=[prompt, source], batch_size=2)
    assert not torch.equal(mask[0], mask[1]) or not torch.equal(glyph_mask[0], glyph_mask[1])  # own masks matter
    with da.apply(hv_pipe, da.TextPatch(layers=everywhere, source_prompt=source)):
        patched = hv_call(hv_pipe, [prompt, "a cat"], cfg=cfg)
    want = hv_call(hv_pipe, [source, source], cfg=cfg)
    assert (patched - want).abs().max() <= ROUNDING
    assert (patched[:1] - hv_call(hv_pipe, prompt, cfg=cfg)).abs().max() > 1e-3


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_hunyuan_video15_patch_with_own_prompt_changes_nothing(hv_pipe, cfg):
    prompts = [PROMPT, HV_QUOTED]
    stock = hv_call(hv_pipe, prompts, cfg=cfg)
    with da.apply(hv_pipe, da.TextPatch(layers=[0, 2], source_prompt=PROMPT)):
        patched = hv_call(hv_pipe, prompts, cfg=cfg)
    assert (patched[:1] - stock[:1]).abs().max() <= ROUNDING
    assert (patched[1:] - stock[1:]).abs().max() > 1e-3  # the second row took the first prompt's text


def test_hunyuan_video15_text_guard(hv_pipe):
    prompt = 'a sign that says "red"'
    guard = da.TextGuard(layers=[0, 1], blocklist=["red"], replacement="blue")
    with da.apply(hv_pipe, guard):
        guarded = hv_call(hv_pipe, prompt)
    with da.apply(hv_pipe, da.TextPatch(layers=[0, 1], source_prompt='a sign that says "blue"')):
        patched = hv_call(hv_pipe, prompt)
    assert torch.equal(guarded, patched) and (guarded - hv_call(hv_pipe, prompt)).abs().max() > 1e-4


def test_hunyuan_video15_image_to_video_patch_keeps_the_image():
    """Image-to-video: the source rows carry their targets' image embeddings, so patching every layer is a run
    of the source prompt on the same image."""
    from PIL import Image

    from dit_attn.toy.hunyuan_video15 import HUNYUAN_VIDEO15_RUN, build_hunyuan_video15_i2v_pipeline

    pipe = build_hunyuan_video15_i2v_pipeline(num_layers=2, num_heads=4, head_dim=8, guidance_scale=3.0)
    pipe.set_progress_bar_config(disable=True)
    args = dict(image=Image.new("RGB", (16, 16), (200, 30, 30)), num_frames=HUNYUAN_VIDEO15_RUN["num_frames"],
                num_inference_steps=2, output_type="latent")
    run = lambda prompt: pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), **args).frames  # noqa: E731
    with CallRecorder(pipe) as rec, da.apply(pipe, da.TextPatch(layers=[0, 1], source_prompt=SOURCE)):
        patched = run(PROMPT)
    embeds = rec.calls[0]["image_embeds"]
    assert embeds.abs().sum() > 0  # image-to-video: the image context is unmasked
    assert (patched - run(SOURCE)).abs().max() <= ROUNDING and (patched - run(PROMPT)).abs().max() > 1e-3


class SwapContext(SwapCaption):
    """SwapCaption that also gives the context keys the source's key mask: a query kept by its own mask sees
    the keys the source's mask keeps."""

    def __init__(self, module, video_tokens, source=None):
        keys, values, self.source_mask = source if source is not None else (None, None, None)
        super().__init__(module, video_tokens, keys, values)
        self.masks = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is F.scaled_dot_product_attention and self.inside:
            mask = kwargs["attn_mask"]  # (B, 1, S, S) bool: own query rows × own key columns
            self.masks.append(mask.clone())
            if self.source_mask is not None:
                kwargs["attn_mask"] = mask.any(-1, keepdim=True) & self.source_mask.any(-2, keepdim=True)
        return super().__torch_function__(func, types, args, kwargs)


def test_hunyuan_video15_one_patched_layer_equals_a_context_swap(hv_pipe):
    """TextPatch on layer 1 only, CFG off: each step's prediction equals the stock call whose layer-1 attention
    gets the context keys, values and key mask of a stock call with the source prompt's encoder outputs."""
    from dit_attn.toy.hunyuan_video15 import HUNYUAN_VIDEO15_RUN

    prompts, source = [PROMPT, HV_QUOTED], 'a sign that says "NO"'
    with CallRecorder(hv_pipe) as rec, da.apply(hv_pipe, da.TextPatch(layers=[1], source_prompt=source)):
        hv_call(hv_pipe, prompts, cfg=1.0)
    embeds, mask, glyphs, glyph_mask = hv_pipe.encode_prompt(prompt=[source] * 2, batch_size=2)
    attn = hv_pipe.transformer.transformer_blocks[1].attn
    video = 3 * 4 * 4  # 3 latent frames of 4×4 tokens at HUNYUAN_VIDEO15_RUN
    assert HUNYUAN_VIDEO15_RUN == dict(num_frames=5, height=16, width=16)
    moved = 0.0
    for call, eps in zip(rec.calls, rec.steps, strict=True):
        source_call = dict(call, encoder_hidden_states=embeds, encoder_attention_mask=mask, encoder_hidden_states_2=glyphs,
                           encoder_attention_mask_2=glyph_mask, return_dict=False)
        with torch.no_grad(), SwapContext(attn, video) as source_run:
            hv_pipe.transformer(**source_call)
        (keys, values), source_mask = source_run.seen[0], source_run.masks[0]
        with torch.no_grad(), SwapContext(attn, video, (keys, values, source_mask)):
            want = hv_pipe.transformer(**dict(call, return_dict=False))[0]
        with torch.no_grad():
            stock = hv_pipe.transformer(**dict(call, return_dict=False))[0]
        assert (eps - want).abs().max() <= ROUNDING
        moved = max(moved, float((eps - stock).abs().max()))
    assert moved > 1e-4

"""NAG with its negative prompt given as embeddings (`NAG(negative_prompt_embeds=...)`), as a pipeline without its text
encoder needs: the embeddings the pipeline's own `encode_prompt` gives the negative prompt must guide exactly as the
negative prompt itself does (which the other NAG tests check against stock attention), per family, on a pipeline with
its text encoders and on one without them; and the refusals."""
import contextlib

import pytest
import torch

import dit_attn as da
from dit_attn.families import family_named
from dit_attn.toy.configs import pipeline_components

from .conftest import CallRecorder, flux_call, sd3_call
from .test_nag_families import qwen_edit  # noqa: F401 (a fixture)

torch.set_num_threads(1)

PROMPTS, NEGATIVE = ["a red circle", "a cat"], "a blue square"
SETTINGS = dict(scale=4.0, tau=1.2, alpha=0.5)


def sd3_embeds(pipe, prompt, length=8):
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, prompt_3=None,
                                              do_classifier_free_guidance=False, max_sequence_length=length)
    return {"negative_prompt_embeds": embeds, "negative_pooled_prompt_embeds": pooled}


def flux_embeds(pipe, prompt, length=8):
    embeds, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, max_sequence_length=length)
    return {"negative_prompt_embeds": embeds, "negative_pooled_prompt_embeds": pooled}


def chroma_embeds(pipe, prompt):
    embeds, _, mask, *_ = pipe.encode_prompt(prompt=prompt, do_classifier_free_guidance=False, max_sequence_length=8)
    return {"negative_prompt_embeds": embeds, "negative_prompt_embeds_mask": mask}


def qwen_embeds(pipe, prompt):
    embeds, mask = pipe.encode_prompt(prompt=prompt, max_sequence_length=16)
    return {"negative_prompt_embeds": embeds, **({} if mask is None else {"negative_prompt_embeds_mask": mask})}


def klein_embeds(pipe, prompt):
    return {"negative_prompt_embeds": pipe.encode_prompt(prompt=prompt, max_sequence_length=16)[0]}


def z_embeds(pipe, prompt):
    captions, _ = pipe.encode_prompt(prompt=[prompt], do_classifier_free_guidance=False)
    return {"negative_prompt_embeds": captions[0][None]}


def wan_embeds(pipe, prompt):
    from dit_attn.toy.wan import WAN_RUN

    length = WAN_RUN.get("max_sequence_length", 512)
    embeds, _ = pipe.encode_prompt(prompt=prompt, do_classifier_free_guidance=False, max_sequence_length=length)
    return {"negative_prompt_embeds": embeds}


def ovis_embeds(pipe, prompt):
    embeds = pipe.encode_prompt(prompt=prompt, do_classifier_free_guidance=False, max_sequence_length=12)[0]
    return {"negative_prompt_embeds": embeds}


def hunyuan_embeds(pipe, prompt):
    """HunyuanImage 2.1 / HunyuanVideo 1.5: the Qwen states and mask and the ByT5 glyph states and mask."""
    per_prompt = "num_videos_per_prompt" if "Video" in type(pipe).__name__ else "num_images_per_prompt"
    embeds, mask, glyphs, glyph_mask = pipe.encode_prompt(prompt=[prompt], batch_size=1, **{per_prompt: 1})
    return {"negative_prompt_embeds": embeds, "negative_prompt_embeds_mask": mask, "negative_prompt_embeds_2": glyphs,
            "negative_prompt_embeds_mask_2": glyph_mask}


def build(name):
    """(pipeline, call(pipe, **kwargs) → output, embeds(pipe, prompt) → NAG's embedding settings)."""
    from dit_attn.toy.configs import build_flux_pipeline, build_sd3_pipeline

    if name == "sd3":
        pipe = build_sd3_pipeline(num_layers=3, num_heads=4, head_dim=8)
        call = lambda p, **k: sd3_call(p, PROMPTS, steps=2, **{"guidance_scale": 1.0, **k})  # noqa: E731
        return pipe, call, sd3_embeds
    if name == "flux":
        pipe = build_flux_pipeline(num_layers=2, num_single_layers=2, num_heads=4, head_dim=8)
        return pipe, lambda p, **k: flux_call(p, PROMPTS, steps=2, **k), flux_embeds
    if name == "chroma":
        from dit_attn.toy.chroma import build_chroma_pipeline

        pipe = build_chroma_pipeline(num_layers=2, num_single_layers=2, num_heads=4, head_dim=8)
        call = lambda p, **k: p(PROMPTS, num_inference_steps=2, guidance_scale=1.0, max_sequence_length=8,  # noqa: E731
                                output_type="latent", height=32, width=32,
                                generator=torch.Generator().manual_seed(0), **k).images
        return pipe, call, chroma_embeds
    if name == "qwen_image":
        from dit_attn.toy.qwen_image import build_qwen_image_pipeline

        from .test_nag_families import qwen_call

        return build_qwen_image_pipeline(num_layers=3, num_heads=4, head_dim=16), qwen_call, qwen_embeds
    if name == "flux2":
        from dit_attn.toy.flux2 import build_flux2_klein_pipeline

        from .test_nag_families import klein_call

        return build_flux2_klein_pipeline(num_layers=2, num_single_layers=2, num_heads=4), klein_call, klein_embeds
    if name == "z_image":
        from dit_attn.toy.z_image import build_z_image_pipeline

        from .test_nag_families import z_call

        pipe = build_z_image_pipeline(num_layers=3, num_refiner_layers=1, num_heads=4, head_dim=8)
        return pipe, z_call, z_embeds
    if name == "wan":
        from dit_attn.toy.wan import build_wan_pipeline

        from .test_wan_nag import wan_call

        return build_wan_pipeline(num_layers=3, num_heads=4, head_dim=12), wan_call, wan_embeds
    if name == "hunyuan_image":
        from dit_attn.toy.hunyuan_image import build_hunyuan_image_pipeline

        from .test_nag_families import hy_call

        pipe = build_hunyuan_image_pipeline(num_layers=2, num_single_layers=2, num_heads=4, head_dim=8,
                                            guidance_embeds=True)
        return pipe, hy_call, hunyuan_embeds
    if name == "hunyuan_video15":
        from dit_attn.toy.hunyuan_video15 import build_hunyuan_video15_pipeline

        from .test_nag_families import hv_call

        return build_hunyuan_video15_pipeline(num_layers=2, num_heads=4, head_dim=8), hv_call, hunyuan_embeds
    from .test_nag_families import flux_clone

    pipe, call = flux_clone("ovis")
    return pipe, lambda p, **k: call(**k), ovis_embeds


FAMILIES = ["sd3", "flux", "chroma", "qwen_image", "flux2", "z_image", "wan", "ovis_image", "hunyuan_image",
            "hunyuan_video15"]
GLYPH_NEGATIVE = 'a blue square "NO"'  # quoted text: HunyuanImage's and HunyuanVideo 1.5's ByT5 glyph states


def negative_of(name: str) -> str:
    return GLYPH_NEGATIVE if name.startswith("hunyuan") else NEGATIVE


def guided(pipe, call, nag, **kwargs):
    with CallRecorder(pipe) as rec, (da.apply(pipe, nag) if nag is not None else contextlib.nullcontext()):
        out = call(pipe, **kwargs)
    return out, len(rec.steps)


@pytest.mark.parametrize("name", FAMILIES)
def test_given_embeddings_guide_as_the_negative_prompt(name):
    """The negative prompt's embeddings from the pipeline's own `encode_prompt` give the very output of NAG with the
    negative prompt, at the stock number of transformer calls; NAG's layers 0…k (token path) and a layer subset (row
    path) alike."""
    pipe, call, embeds = build(name)
    pipe.set_progress_bar_config(disable=True)
    stock, stock_calls = guided(pipe, call, None)
    given = embeds(pipe, negative_of(name))
    for layers in (None, (1,)):
        from_prompt, _ = guided(pipe, call, da.NAG(negative_of(name), layers=layers, **SETTINGS))
        assert (from_prompt - stock).abs().max() > 1e-3
        out, calls = guided(pipe, call, da.NAG(**given, layers=layers, **SETTINGS))
        assert calls == stock_calls
        assert (out - from_prompt).abs().max() <= 1e-6


@pytest.mark.parametrize("name,cfg", [("sd3", {"guidance_scale": 4.0, "negative_prompt": "a green cat"}),
                                      ("qwen_image", {"true_cfg_scale": 3.0, "negative_prompt": "a green cat"}),
                                      ("hunyuan_video15", {"cfg": 4.0, "negative_prompt": ['a green cat "X"', "dark"]})])
def test_given_embeddings_with_cfg(name, cfg):
    """With CFG on (SD3's batched unconditional rows; Qwen-Image's second call, its negative prompt encoded at its own
    length; HunyuanVideo 1.5's guider call with its own glyph states) the given embeddings still guide as the negative
    prompt does."""
    pipe, call, embeds = build(name)
    pipe.set_progress_bar_config(disable=True)
    stock, _ = guided(pipe, call, None, **cfg)
    from_prompt, _ = guided(pipe, call, da.NAG(negative_of(name), **SETTINGS), **cfg)
    assert (from_prompt - stock).abs().max() > 1e-3
    out, _ = guided(pipe, call, da.NAG(**embeds(pipe, negative_of(name)), **SETTINGS), **cfg)
    # HunyuanVideo 1.5's Z⁻ already differs between the two runs by float rounding (≈ 2e-7); NAG's extrapolation
    # (scale 4) and clipping amplify it
    assert (out - from_prompt).abs().max() <= 2e-6


def test_qwen_image_takes_embeddings_of_any_length_as_its_encoder_path_does():
    """Qwen-Image pads each call's text to its longest prompt: a shorter negative prompt's embeddings are padded with
    masked zero states and a longer one's cut at the call's length, as the encoded negative prompt is."""
    pipe, call, embeds = build("qwen_image")
    pipe.set_progress_bar_config(disable=True)
    for negative in ("blue", "a blue square on a green ground under a grey sky with birds"):
        from_prompt, _ = guided(pipe, call, da.NAG(negative, **SETTINGS))
        out, _ = guided(pipe, call, da.NAG(**embeds(pipe, negative), **SETTINGS))
        assert (out - from_prompt).abs().max() <= 1e-6


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_nag_on_a_pipeline_without_text_encoders(name):
    """Prompts and the negative prompt encoded first, then the text encoders dropped: the call with prompt embeddings
    equals the one of the full pipeline with prompts; NAG with a negative prompt is refused there in one line."""
    pipe, call, embeds = build(name)
    pipe.set_progress_bar_config(disable=True)
    nag = da.NAG(NEGATIVE, **SETTINGS)
    reference, _ = guided(pipe, call, nag)
    own = embeds(pipe, PROMPTS)
    prompt_inputs = {"prompt_embeds": own["negative_prompt_embeds"],
                     "pooled_prompt_embeds": own["negative_pooled_prompt_embeds"]}
    given = embeds(pipe, NEGATIVE)
    encoders = [k for k in pipe.components if k.startswith("text_encoder") or k.startswith("tokenizer")]
    bare = type(pipe)(**{**pipeline_components(pipe), **{k: None for k in encoders}})
    bare.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    settings = dict(num_inference_steps=2, output_type="latent", height=32, width=32, generator=generator,
                    guidance_scale=1.0 if name == "sd3" else 3.5)
    with da.apply(bare, da.NAG(**given, **SETTINGS)):
        out = bare(**prompt_inputs, **settings).images
    assert (out - reference).abs().max() <= 1e-6
    with pytest.raises(ValueError, match=r"text_encoder=None: .* \(or give NAG negative_prompt_embeds\)"):
        da.apply(bare, nag)


@pytest.mark.parametrize("name", ["hunyuan_image", "hunyuan_video15"])
def test_hunyuan_nag_on_a_pipeline_without_text_encoders(name):
    """HunyuanImage 2.1 and HunyuanVideo 1.5 without their Qwen and ByT5 encoders, called with all four prompt inputs:
    NAG with the negative prompt's four gives the full pipeline's output with the negative prompt."""
    from .test_nag_families import HY_PROMPTS

    pipe, call, embeds = build(name)
    pipe.set_progress_bar_config(disable=True)
    reference, _ = guided(pipe, call, da.NAG(GLYPH_NEGATIVE, **SETTINGS))
    per_prompt = "num_videos_per_prompt" if name == "hunyuan_video15" else "num_images_per_prompt"
    own = pipe.encode_prompt(prompt=HY_PROMPTS, batch_size=len(HY_PROMPTS), **{per_prompt: 1})
    prompt_inputs = dict(zip(("prompt_embeds", "prompt_embeds_mask", "prompt_embeds_2", "prompt_embeds_mask_2"), own))
    encoders = [k for k in pipe.components if k.startswith("text_encoder") or k.startswith("tokenizer")]
    bare = type(pipe)(**{**pipeline_components(pipe), **{k: None for k in encoders}})
    bare.set_progress_bar_config(disable=True)
    with da.apply(bare, da.NAG(**embeds(pipe, GLYPH_NEGATIVE), **SETTINGS)):
        out = call(bare, prompt=None, **prompt_inputs)
    assert (out - reference).abs().max() <= 1e-6
    with pytest.raises(ValueError, match=r"text_encoder=None: .* \(or give NAG negative_prompt_embeds\)"):
        da.apply(bare, da.NAG(GLYPH_NEGATIVE))


def test_hunyuan_glyph_states_are_checked_in_one_line():
    pipe, call, embeds = build("hunyuan_image")
    pipe.set_progress_bar_config(disable=True)
    given = embeds(pipe, GLYPH_NEGATIVE)
    without = {k: v for k, v in given.items() if not k.endswith("_2")}
    with pytest.raises(ValueError, match="needs the ByT5 glyph states with negative_prompt_embeds: negative_prompt_embeds_2"):
        da.apply(pipe, da.NAG(**without))
    with pytest.raises(ValueError, match="negative_prompt_embeds_2 and negative_prompt_embeds_mask_2 go together"):
        da.NAG(**{**without, "negative_prompt_embeds_2": given["negative_prompt_embeds_2"]})
    short = {**given, "negative_prompt_embeds_2": given["negative_prompt_embeds_2"][:, :5],
             "negative_prompt_embeds_mask_2": given["negative_prompt_embeds_mask_2"][:, :5]}
    for layers in (None, (1,)):
        with pytest.raises(ValueError, match="the call has 8 ByT5 glyph tokens, the source .* 5: encode"):
            guided(pipe, call, da.NAG(**short, layers=layers))
    wide = {**given, "negative_prompt_embeds_2": torch.randn(1, 8, 7)}
    with pytest.raises(ValueError, match="negative_prompt_embeds_2 are 7 wide, this call's encoder_hidden_states_2 32"):
        guided(pipe, call, da.NAG(**wide))


def test_embeddings_at_another_text_length_are_refused_in_one_line():
    pipe, call, _ = build("flux")
    pipe.set_progress_bar_config(disable=True)
    nag = da.NAG(**flux_embeds(pipe, NEGATIVE, length=12))
    with pytest.raises(ValueError, match=r"negative_prompt_embeds have 12 text tokens, this call's prompt 8: encode"):
        guided(pipe, call, nag)


def test_embeddings_of_another_width_are_refused_in_one_line():
    pipe, call, _ = build("sd3")
    pipe.set_progress_bar_config(disable=True)
    given = sd3_embeds(pipe, NEGATIVE)
    wide = torch.randn(*given["negative_prompt_embeds"].shape[:2], 2 * given["negative_prompt_embeds"].shape[-1])
    with pytest.raises(ValueError, match=r"negative_prompt_embeds are 128 wide, this call's encoder_hidden_states 64"):
        guided(pipe, call, da.NAG(negative_prompt_embeds=wide,
                                  negative_pooled_prompt_embeds=given["negative_pooled_prompt_embeds"]))
    with pytest.raises(ValueError, match=r"negative_pooled_prompt_embeds are 3 wide"):
        guided(pipe, call, da.NAG(negative_prompt_embeds=given["negative_prompt_embeds"],
                                  negative_pooled_prompt_embeds=torch.randn(1, 3)))


def test_settings_name_the_embeddings_by_digest():
    embeds, pooled = torch.randn(1, 5, 8), torch.randn(1, 4)
    nag = da.NAG(negative_prompt_embeds=embeds, negative_pooled_prompt_embeds=pooled, scale=3.0)
    settings = nag.to_dict()
    assert settings["negative_prompt_embeds"]["shape"] == [1, 5, 8]
    assert settings["negative_prompt_embeds"]["dtype"] == "float32"
    assert "negative_prompt_embeds_mask" not in settings
    same = da.NAG(negative_prompt_embeds=embeds.clone(), negative_pooled_prompt_embeds=pooled, scale=3.0).to_dict()
    assert same == settings
    changed = embeds.clone()
    changed[0, 0, 0] += 1e-3
    other = da.NAG(negative_prompt_embeds=changed, negative_pooled_prompt_embeds=pooled, scale=3.0).to_dict()
    assert other["negative_prompt_embeds"]["sha256"] != settings["negative_prompt_embeds"]["sha256"]
    with pytest.raises(ValueError, match="rebuild the NAG with the tensors"):
        da.NAG.from_dict(settings)
    assert repr(nag).startswith("NAG(scale=3.0, tau=2.5,") and "negative_prompt_embeds=<tensor (1, 5, 8) float32>" in repr(nag)
    glyphs = da.NAG(negative_prompt_embeds=embeds, negative_prompt_embeds_mask=torch.ones(1, 5),
                    negative_prompt_embeds_2=torch.randn(1, 3, 2), negative_prompt_embeds_mask_2=torch.ones(1, 3)).to_dict()
    assert glyphs["negative_prompt_embeds_2"]["shape"] == [1, 3, 2] and glyphs["negative_prompt_embeds_mask_2"]["shape"] == [1, 3]
    assert "negative_prompt_embeds" not in da.NAG("blurry").to_dict()  # a prompt's settings stay as they were
    assert da.NAG.from_dict(da.NAG("blurry").to_dict()) == da.NAG("blurry")


def test_bad_embeddings_are_refused_in_one_line():
    embeds = torch.randn(1, 5, 8)
    cases = [
        (dict(negative_prompt="blurry", negative_prompt_embeds=embeds), ValueError, "not both"),
        (dict(negative_pooled_prompt_embeds=torch.randn(1, 4)), ValueError, "go with negative_prompt_embeds"),
        (dict(negative_prompt_embeds=[[1.0]]), TypeError, "must be a torch.Tensor"),
        (dict(negative_prompt_embeds=torch.randn(2, 5)), ValueError, r"must be \(N, S, D\), a row per negative prompt .* got shape \(2, 5\)"),
        (dict(negative_prompt_embeds=torch.randn(2, 5, 8), negative_prompt_embeds_mask=torch.ones(1, 5)), ValueError,
         r"negative_prompt_embeds_mask must be \(2, S\)"),
        (dict(negative_prompt_embeds=torch.ones(1, 5, 8, dtype=torch.long)), TypeError, "floating point"),
        (dict(negative_prompt_embeds=embeds, negative_prompt_embeds_mask=torch.ones(1, 4)), ValueError,
         "covers 4 tokens, negative_prompt_embeds has 5"),
        (dict(negative_prompt_embeds=embeds, negative_pooled_prompt_embeds=torch.randn(4)), ValueError, r"\(1, P\)"),
        (dict(negative_prompt_embeds=embeds, negative_prompt_embeds_2=torch.randn(3, 2),
              negative_prompt_embeds_mask_2=torch.ones(1, 3)), ValueError, r"negative_prompt_embeds_2 must be \(1, S, D\)"),
        (dict(negative_prompt_embeds=embeds, negative_prompt_embeds_2=torch.randn(1, 3, 2),
              negative_prompt_embeds_mask_2=torch.ones(1, 4)), ValueError, "mask_2 covers 4 tokens, negative_prompt_embeds_2 has 3"),
        (dict(negative_prompt_embeds_mask_2=torch.ones(1, 4)), ValueError, "go with negative_prompt_embeds"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            da.NAG(**kwargs)


def test_families_refuse_embeddings_they_do_not_take():
    embeds, pooled, mask = torch.randn(1, 5, 8), torch.randn(1, 4), torch.ones(1, 5)
    sd3 = family_named("SD3Transformer2DModel")
    with pytest.raises(ValueError, match="needs negative_pooled_prompt_embeds"):
        sd3.check_given_negative(da.NAG(negative_prompt_embeds=embeds))
    with pytest.raises(ValueError, match="sd3 models take no negative_prompt_embeds_mask"):
        sd3.check_given_negative(da.NAG(negative_prompt_embeds=embeds, negative_pooled_prompt_embeds=pooled,
                                        negative_prompt_embeds_mask=mask))
    with pytest.raises(ValueError, match="chroma needs negative_prompt_embeds_mask"):
        family_named("ChromaTransformer2DModel").check_given_negative(da.NAG(negative_prompt_embeds=embeds))
    with pytest.raises(ValueError, match="qwen_image models take no negative_pooled_prompt_embeds"):
        family_named("QwenImageTransformer2DModel").check_given_negative(
            da.NAG(negative_prompt_embeds=embeds, negative_pooled_prompt_embeds=pooled))
    with pytest.raises(ValueError, match="sd3 models take no negative_prompt_embeds_2"):
        sd3.check_given_negative(da.NAG(negative_prompt_embeds=embeds, negative_pooled_prompt_embeds=pooled,
                                        negative_prompt_embeds_2=embeds, negative_prompt_embeds_mask_2=mask))


def test_qwen_image_edit_takes_embeddings_encoded_with_the_reference_image(qwen_edit):
    """Qwen-Image-Edit encodes each prompt with its reference image: the negative prompt's embeddings encoded with the
    image the pipeline hands its `encode_prompt` guide as the negative prompt does."""
    from .test_nag_families import edit_call

    seen, encode = {}, qwen_edit.encode_prompt
    qwen_edit.encode_prompt = lambda *args, **kwargs: seen.update(kwargs) or encode(*args, **kwargs)
    try:
        stock = edit_call(qwen_edit)
    finally:
        del qwen_edit.encode_prompt
    embeds, mask = qwen_edit.encode_prompt(prompt=NEGATIVE, image=seen["image"])
    given = {"negative_prompt_embeds": embeds, **({} if mask is None else {"negative_prompt_embeds_mask": mask})}
    from_prompt, _ = guided(qwen_edit, lambda p: edit_call(p), da.NAG(NEGATIVE, **SETTINGS))
    assert (from_prompt - stock).abs().max() > 1e-3
    out, _ = guided(qwen_edit, lambda p: edit_call(p), da.NAG(**given, **SETTINGS))
    assert (out - from_prompt).abs().max() <= 1e-6

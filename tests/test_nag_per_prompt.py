"""NAG with a negative prompt per prompt of the call (`NAG(negative_prompt=[...])`, as a pipeline's own
`negative_prompt` list): each prompt's rows must come out as NAG with that prompt's negative alone gives them (which
the other NAG tests check against stock attention), per family, on the token path (layers 0…k) and the row path (a
layer subset), at the stock number of transformer calls; given embeddings of a row per prompt as the list; and the
refusals."""
import contextlib
import json

import pytest
import torch

import dit_attn as da

from .conftest import CallRecorder, sd3_call
from .test_nag_embeds import FAMILIES as EMBEDDING_FAMILIES
from .test_nag_embeds import SETTINGS, build, hunyuan_embeds
from .test_nag_families import flux_clone, hy_call
from .test_nag_families import hv_call as hv_video_call

torch.set_num_threads(1)

NEGATIVES = ("a blue square", "a dog")


def hunyuan_image():
    from dit_attn.toy.hunyuan_image import build_hunyuan_image_pipeline

    pipe = build_hunyuan_image_pipeline(num_layers=2, num_single_layers=2, num_heads=4, head_dim=8, guidance_embeds=True)
    return pipe, lambda p, **k: hy_call(p, **k)


def pipeline(name):
    pipe, call, _ = pipeline_and_embeds(name)
    return pipe, call


def pipeline_and_embeds(name):
    """(pipeline, call of two prompts, `test_nag_embeds`' embeds(pipe, prompt) of the family or None)."""
    embeds = None
    if name == "hunyuan_image":
        pipe, call = hunyuan_image()
    elif name == "hunyuan_video15":
        from dit_attn.toy.hunyuan_video15 import build_hunyuan_video15_pipeline

        pipe, call = build_hunyuan_video15_pipeline(num_layers=2, num_heads=4, head_dim=8), hv_video_call
    elif name in ("longcat", "bria"):
        pipe, clone_call = flux_clone(name)
        call = lambda p, **k: clone_call(prompt=["a red circle", "a cat"], **k)  # noqa: E731
    else:
        pipe, call, embeds = build(name)
        if name == "ovis_image":  # its call's default is one prompt
            call = (lambda c: lambda p, **k: c(p, prompt=["a red circle", "a cat"], **k))(call)
    if name.startswith("hunyuan"):
        embeds = hunyuan_embeds
    pipe.set_progress_bar_config(disable=True)
    return pipe, call, embeds


def guided(pipe, call, edits, **kwargs):
    """(output, transformer calls) of the call under `edits`."""
    with CallRecorder(pipe) as rec, (da.apply(pipe, *edits) if edits else contextlib.nullcontext()):
        out = call(pipe, **kwargs)
    return out, len(rec.steps)


def assert_rows_take_their_negatives(pipe, call, extra=(), per_prompt_rows=1, negatives=NEGATIVES, **kwargs):
    """The per-prompt NAG's rows of prompt i equal those of NAG with negative i alone (same call, same noise),
    at the stock call count; the two negatives give those rows different outputs."""
    _, stock_calls = guided(pipe, call, (), **kwargs)
    for layers in (None, (1,)):
        alone = [guided(pipe, call, [da.NAG(n, layers=layers, **SETTINGS), *extra], **kwargs)[0] for n in negatives]
        out, calls = guided(pipe, call, [da.NAG(list(negatives), layers=layers, **SETTINGS), *extra], **kwargs)
        assert calls == stock_calls
        assert out.shape[0] == len(negatives) * per_prompt_rows
        for i, single in enumerate(alone):
            rows = slice(i * per_prompt_rows, (i + 1) * per_prompt_rows)
            assert (out[rows] - single[rows]).abs().max() <= 1e-5, (layers, i)
        second = slice(per_prompt_rows, 2 * per_prompt_rows)
        assert (alone[0][second] - alone[1][second]).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["sd3", "flux", "chroma", "qwen_image", "flux2", "z_image", "wan", "ovis_image",
                                  "hunyuan_image", "hunyuan_video15", "longcat", "bria"])
def test_each_prompt_takes_its_negative(name):
    """Every family, on its token path (layers 0…k) and its row path (a layer subset)."""
    pipe, call = pipeline(name)
    assert_rows_take_their_negatives(pipe, call)


def test_z_image_negative_captions_of_other_lengths():
    """Z-Image's negative caption segments are padded to multiples of 32 tokens: a 32- and a 64-token one ride in one
    call, the shorter padded under a key mask on the token path."""
    pipe, call = pipeline("z_image")
    negatives = ("a dog", "a blue square " * 12)
    assert_rows_take_their_negatives(pipe, call, negatives=negatives)
    assert_rows_take_their_negatives(pipe, call, negatives=negatives, guidance_scale=3.0)  # CFG: one call, cond first


def test_images_per_prompt_and_cfg_on_sd3():
    pipe, call = pipeline("sd3")
    assert_rows_take_their_negatives(pipe, call, per_prompt_rows=2, num_images_per_prompt=2)
    assert_rows_take_their_negatives(pipe, call, guidance_scale=3.0)


def test_cfg_in_the_call_on_bria():
    """Bria's CFG is one transformer call [uncond ; cond]: the conditional rows take their prompts' negatives."""
    pipe, call = pipeline("bria")
    assert_rows_take_their_negatives(pipe, call, guidance_scale=3.0)


@pytest.mark.parametrize("name", ["z_image", "hunyuan_image", "hunyuan_video15"])
def test_rows_with_their_own_negatives_keep_the_token_path(name):
    """Z-Image, HunyuanImage and HunyuanVideo 1.5 prepare each row's own negative text (Z-Image: negative captions of
    other lengths padded under a key mask): a call with a negative prompt per prompt keeps its rows (the negative
    text rides as tokens), as with one negative prompt; the row path would add a negative row per conditional row."""
    pipe, call = pipeline(name)
    seen = []
    blocks = pipe.transformer.layers if name == "z_image" else pipe.transformer.transformer_blocks
    hook = blocks[0].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[0] if args else next(iter(kwargs.values()))).shape[0]),
        with_kwargs=True)
    try:
        for edits in ((), [da.NAG(NEGATIVES[0], **SETTINGS)], [da.NAG(list(NEGATIVES), **SETTINGS)]):
            seen.clear()
            guided(pipe, call, edits)
            if not edits:
                stock = list(seen)
            assert seen == stock, edits
    finally:
        hook.remove()


@pytest.mark.parametrize("name,heads", [("sd3", ["L1H2"]), ("wan", ["L1H1"]), ("hunyuan_image", ["L1H1"]),
                                        ("z_image", ["L1H1"])])
def test_with_head_guidance(name, heads):
    """HeadGuidance's perturbed copies are NAG-guided with their rows' own negatives (SD3: forked at a block;
    Wan: at the call, its negative text in a cross-attention; HunyuanImage, Z-Image: at the call, each copy's negative
    text as tokens of its row)."""
    pipe, call = pipeline(name)
    assert_rows_take_their_negatives(pipe, call, extra=(da.HeadGuidance(heads=heads, scale=2.0),))


def test_calls_with_prompt_embeddings_are_counted():
    """A call with prompt_embeds instead of prompt: its prompts are the embeddings' rows."""
    pipe, _ = pipeline("sd3")
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=["a red circle", "a cat"], prompt_2=None, prompt_3=None,
                                              do_classifier_free_guidance=False, max_sequence_length=8)

    def call(p, **kwargs):
        return sd3_call(p, None, steps=2, guidance_scale=1.0, prompt_embeds=embeds, pooled_prompt_embeds=pooled,
                        **kwargs)

    assert_rows_take_their_negatives(pipe, call)


def test_another_number_of_prompts_is_refused_before_the_call_runs():
    pipe, call = pipeline("sd3")
    with pytest.raises(ValueError, match="NAG has 3 negative prompts and this call 2 prompts"):
        with CallRecorder(pipe) as rec, da.apply(pipe, da.NAG(["a", "b", "c"])):
            call(pipe)
    assert rec.steps == []
    z_pipe, z_call = pipeline("z_image")  # no check_inputs: counted at its encode_prompt
    with da.apply(z_pipe, da.NAG(["a"])):
        with pytest.raises(ValueError, match="NAG has 1 negative prompts and this call 2 prompts"):
            z_call(z_pipe)


def stacked_rows(settings: list[dict]) -> dict:
    """NAG's embedding settings of several negative prompts (each its own, one row) as one setting of a row per
    prompt; text states of other lengths padded with zero states that their mask leaves out (as a pipeline pads a
    prompt list; Qwen-Image's optional mask: all tokens valid where it is not given)."""
    settings = [dict(s) for s in settings]
    text = settings[0]["negative_prompt_embeds"]
    if any(s["negative_prompt_embeds"].shape[1] != text.shape[1] for s in settings):
        for s in settings:
            s.setdefault("negative_prompt_embeds_mask", torch.ones(s["negative_prompt_embeds"].shape[:2], dtype=torch.long))
    out = {}
    for name in settings[0]:
        rows = [s[name] for s in settings]
        length = max(r.shape[1] for r in rows)
        out[name] = torch.cat([torch.nn.functional.pad(r, (0, 0) * (r.ndim - 2) + (0, length - r.shape[1])) for r in rows])
    return out


@pytest.mark.parametrize("name", EMBEDDING_FAMILIES)
def test_given_embeddings_of_a_row_per_prompt_are_the_negative_prompt_list(name):
    """NAG(negative_prompt_embeds=) of a row per prompt, each negative prompt's embeddings from the pipeline's own
    encode_prompt, gives the output of NAG with the list of negative prompts (which `assert_rows_take_their_negatives`
    checks against NAG with each alone), at the stock call count; token path (layers 0…k) and row path alike."""
    pipe, call, embeds = pipeline_and_embeds(name)
    # Z-Image takes a caption at its own length: negatives of one length
    negatives = ("a blue square", "a green square") if name == "z_image" else NEGATIVES
    given = stacked_rows([embeds(pipe, n) for n in negatives])
    _, stock_calls = guided(pipe, call, ())
    for layers in (None, (1,)):
        listed, _ = guided(pipe, call, [da.NAG(list(negatives), layers=layers, **SETTINGS)])
        out, calls = guided(pipe, call, [da.NAG(**given, layers=layers, **SETTINGS)])
        assert calls == stock_calls
        assert (out - listed).abs().max() <= 2e-6, layers
    one, _ = guided(pipe, call, [da.NAG(negatives[0], **SETTINGS)])
    assert (out - one).abs().max() > 1e-4  # the second prompt's rows take the second row


def test_given_rows_for_another_number_of_prompts_are_refused_before_the_call_runs():
    pipe, call, embeds = pipeline_and_embeds("sd3")
    given = stacked_rows([embeds(pipe, n) for n in ("a", "b", "c")])
    with pytest.raises(ValueError, match="negative_prompt_embeds have 3 rows and this call 2 prompts: give a row per"):
        with CallRecorder(pipe) as rec, da.apply(pipe, da.NAG(**given)):
            call(pipe)
    assert rec.steps == []
    with pytest.raises(ValueError, match=r"negative_pooled_prompt_embeds must be \(3, P\), a row per negative prompt"):
        da.NAG(negative_prompt_embeds=given["negative_prompt_embeds"],
               negative_pooled_prompt_embeds=given["negative_pooled_prompt_embeds"][:1])
    assert da.NAG(**given).per_prompt and not da.NAG(**embeds(pipe, "a")).per_prompt


@pytest.mark.parametrize("bad", [[], ["a", " "], ["a", 3], 5, None])
def test_bad_lists_are_refused(bad):
    with pytest.raises(ValueError, match="negative_prompt must be a non-empty string, or a list of them"):
        da.NAG(bad)


def test_settings_keep_the_list():
    nag = da.NAG(["a", "b"], scale=3.0)
    data = json.loads(json.dumps(nag.to_dict()))
    assert data["negative_prompt"] == ["a", "b"]
    assert da.NAG.from_dict(data) == nag and nag.per_prompt and not da.NAG("a").per_prompt

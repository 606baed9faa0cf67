"""NAG on Qwen-Image and FLUX.2 Klein, checked against the stock attention modules run on the positive
and on the negative text (the formula of tests/test_nag.py), stock at scale 1 / alpha 0, the stock call
count, and the unconditional call of CFG left stock."""
import contextlib

import pytest
import torch

import dit_attn as da
from dit_attn.families import family_of
from dit_attn.toy.flux2 import build_flux2_klein_pipeline
from dit_attn.toy.qwen_image import build_qwen_image_pipeline

from .conftest import CallRecorder, check_shared_image_keys, flux_attention_module
from .test_nag import ROUNDING, SETTINGS, _clone, nag_formula

# Qwen-Image: "a cat" encodes one token shorter than "a red circle", "blue" two: every row's mask matters
QWEN_PROMPTS, QWEN_NEGATIVE = ["a red circle", "a cat"], "blue"
KLEIN_PROMPTS, KLEIN_NEGATIVE = ["a red circle", "a green cat"], "a blue square"


@pytest.fixture(scope="module")
def qwen():
    pipe = build_qwen_image_pipeline(num_layers=3, num_heads=4, head_dim=16)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def klein():
    pipe = build_flux2_klein_pipeline(num_layers=2, num_single_layers=2, num_heads=4)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def qwen_call(pipe, prompt=QWEN_PROMPTS, steps=2, **kwargs):
    args = dict(prompt=prompt, num_inference_steps=steps, true_cfg_scale=1.0, max_sequence_length=16,
                output_type="latent", height=32, width=32, generator=torch.Generator().manual_seed(0))
    return pipe(**{**args, **kwargs}).images


def klein_call(pipe, prompt=KLEIN_PROMPTS, steps=2, **kwargs):
    args = dict(prompt=prompt, height=32, width=32, num_inference_steps=steps, guidance_scale=1.0,
                max_sequence_length=16, output_type="latent", generator=torch.Generator().manual_seed(0))
    return pipe(**{**args, **kwargs}).images


CASES = {"qwen": (qwen_call, QWEN_NEGATIVE), "klein": (klein_call, KLEIN_NEGATIVE)}
CFG = {"qwen": {"true_cfg_scale": 3.0, "negative_prompt": "a green cat"}, "klein": {"guidance_scale": 3.0}}


def attention_modules(pipe):
    t = pipe.transformer
    return [b.attn for b in list(t.transformer_blocks) + list(getattr(t, "single_transformer_blocks", ()))]


class Recorder:
    """Inputs (by name) and outputs of every call of these attention modules."""

    def __init__(self, transformer, modules):
        self.transformer, self.modules = transformer, modules
        self.records = {i: [] for i in range(len(modules))}  # per module: (inputs, output, transformer call index)
        self.calls = -1

    def __enter__(self):
        def hook(i):
            def record(m, args, kwargs, out):
                named = dict(zip(("hidden_states", "encoder_hidden_states"), args)) | kwargs
                self.records[i].append(({k: _clone(v) for k, v in named.items()}, _clone(out), self.calls))
            return record

        def count(m, args):
            self.calls += 1

        self.hooks = [m.register_forward_hook(hook(i), with_kwargs=True) for i, m in enumerate(self.modules)]
        self.hooks.append(self.transformer.register_forward_pre_hook(count))
        return self

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()


def projection(attn):
    """The module whose input is the merged-heads attention output (FLUX.2 single: fused with the MLP)."""
    return attn.to_out[0] if isinstance(attn.to_out, torch.nn.ModuleList) else attn.to_out


def stock(attn, kwargs):
    """(output, input of its output projection) of the stock module."""
    captured = {}
    handle = projection(attn).register_forward_pre_hook(lambda m, a: captured.__setitem__("z", a[0].clone()))
    try:
        with torch.no_grad():
            out = attn(**kwargs)
    finally:
        handle.remove()
    return out, captured["z"]


def rows_of(kwargs, rows, text_rows, text_len, single):
    """The module inputs of `rows`, text tokens (and Qwen-Image's text mask) from `text_rows`."""
    out = dict(kwargs)
    h = kwargs["hidden_states"]
    if single:
        out["hidden_states"] = torch.cat([h[text_rows, :text_len], h[rows, text_len:]], dim=1)
    else:
        out["hidden_states"] = h[rows]
        out["encoder_hidden_states"] = kwargs["encoder_hidden_states"][text_rows]
    if isinstance(kwargs.get("encoder_hidden_states_mask"), torch.Tensor):
        out["encoder_hidden_states_mask"] = kwargs["encoder_hidden_states_mask"][text_rows]
    return out


def split(out, text_len, single):
    """(image, text) outputs of a module call, batch first."""
    if single:
        return out[:, text_len:], out[:, :text_len]
    return out  # Qwen-Image: (image, text); FLUX.2 double: (image, text)


def check_layer(attn, kwargs, out, n, text_len, single):
    cond, negative = list(range(n)), list(range(n, 2 * n))
    pos_out, zp_all = stock(attn, rows_of(kwargs, cond, cond, text_len, single))
    neg_out, zn_all = stock(attn, rows_of(kwargs, cond, negative, text_len, single))
    inner = attn.inner_dim
    if single:  # the fused projection's input: [attention (all tokens) ; MLP]
        zp, zn = zp_all[:, text_len:, :inner], zn_all[:, text_len:, :inner]
    else:  # Qwen-Image and FLUX.2 double blocks project the image tokens alone
        zp, zn = zp_all, zn_all
    mixed, ratio = nag_formula(zp, zn, **SETTINGS)
    if single:
        fused = zp_all.clone()
        fused[:, text_len:, :inner] = mixed
        want_image = attn.to_out(fused)[:, text_len:]
    else:
        want_image = attn.to_out[0](mixed)
        if len(attn.to_out) > 1:
            want_image = attn.to_out[1](want_image)
    got_image, got_text = split(out, text_len, single)
    pos_image, pos_text = split(pos_out, text_len, single)
    assert (got_image[cond] - want_image).abs().max() <= ROUNDING
    assert (want_image - pos_image).abs().max() > 1e-3  # the guidance does something
    assert (got_text[cond] - pos_text).abs().max() <= ROUNDING
    assert (got_text[negative] - split(neg_out, text_len, single)[1]).abs().max() <= ROUNDING
    return ratio.flatten()


@pytest.mark.parametrize("case,layer", [("qwen", 0), ("qwen", 2), ("klein", 1), ("klein", 2), ("klein", 3)])
def test_layer_equals_stock_attention_on_both_texts(case, layer, request, monkeypatch):
    """Qwen-Image (padded prompts and a padded negative prompt) and FLUX.2 Klein double (1) and single (2, 3)
    blocks, on the row path (the token path equals it: test_*_token_path_equals_row_path); with CFG on, every layer
    of the unconditional call is the stock module on its inputs."""
    from dit_attn.hooks import nag_tokens

    monkeypatch.setattr(nag_tokens, "TOKEN_FAMILIES", ())
    pipe = request.getfixturevalue(case)
    call, negative = CASES[case]
    modules = attention_modules(pipe)
    single = case == "klein" and layer >= len(pipe.transformer.transformer_blocks)
    with Recorder(pipe.transformer, modules) as rec, da.apply(pipe, da.NAG(negative, layers=[layer], **SETTINGS)):
        call(pipe, **CFG[case])
    n = len(QWEN_PROMPTS if case == "qwen" else KLEIN_PROMPTS)
    assert rec.calls == 3  # 2 steps of [conditional call ; unconditional call]
    guided = [r[:2] for r in rec.records[layer] if r[2] % 2 == 0]
    unguided = [(i, r[:2]) for i in rec.records for r in rec.records[i] if r[2] % 2 == 1]
    assert len(guided) == 2 and all(r[0]["hidden_states"].shape[0] == 2 * n for r in guided)
    assert len(unguided) == 2 * len(modules) and all(r[0]["hidden_states"].shape[0] == n for _, r in unguided)
    text_len = rec.records[0][0][0]["encoder_hidden_states"].shape[1]
    if case == "qwen":  # the negative rows carry their own prompt's text mask, at every layer
        family = family_of(pipe.transformer)
        _, own = family.encode_prompts(pipe, [negative], text_len)
        for i in rec.records:
            for kwargs, _, _ in rec.records[i]:
                if kwargs["hidden_states"].shape[0] == 2 * n:
                    mask = kwargs["encoder_hidden_states_mask"]
                    assert mask[n:].bool().tolist() == own.bool().expand(n, -1).tolist()
                    assert not bool(mask[n:].bool().all()) and not bool(mask[:n].bool().all())
    ratios = torch.cat([check_layer(modules[layer], kwargs, out, n, text_len, single) for kwargs, out in guided])
    assert bool((ratios > SETTINGS["tau"]).any())  # the clipping is exercised
    for i, (kwargs, out) in unguided:  # CFG's unconditional call: stock
        want, _ = stock(modules[i], kwargs)
        got = out if isinstance(out, tuple) else (out,)
        want = want if isinstance(want, tuple) else (want,)
        assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("case", ["qwen", "klein"])
def test_scale_one_and_alpha_zero_are_stock(case, request):
    pipe = request.getfixturevalue(case)
    call, negative = CASES[case]
    want = call(pipe)
    for edit in (da.NAG(negative, scale=1), da.NAG(negative, alpha=0)):
        with da.apply(pipe, edit):
            assert torch.equal(call(pipe), want)
    with da.apply(pipe, da.NAG(negative)):
        assert (call(pipe) - want).abs().max() > 1e-3


@pytest.mark.parametrize("case,cfg", [("qwen", False), ("qwen", True), ("klein", False), ("klein", True)])
def test_call_count_equals_stock(case, cfg, request):
    pipe = request.getfixturevalue(case)
    call, negative = CASES[case]
    kwargs = CFG[case] if cfg else {}
    with CallRecorder(pipe) as before:
        call(pipe, **kwargs)
    counted = []
    hook = pipe.transformer.transformer_blocks[0].register_forward_pre_hook(lambda m, a: counted.append(1))
    try:
        with CallRecorder(pipe) as rec, da.apply(pipe, da.NAG(negative)):
            call(pipe, **kwargs)
    finally:
        hook.remove()
    assert len(rec.calls) == len(counted) == len(before.calls) == (4 if cfg else 2)
    assert [c["hidden_states"].shape for c in rec.calls] == [c["hidden_states"].shape for c in before.calls]


# ---------------------------------------------------------------- Z-Image: single stream [image ; caption] per row
Z_PROMPTS, Z_LONG = ["a red circle", "a cat"], " ".join(["a blurry dark blue square"] * 8)  # Z_LONG: > 32 tokens


@pytest.fixture(scope="module")
def z_pipe():
    from dit_attn.toy.z_image import build_z_image_pipeline

    pipe = build_z_image_pipeline(num_layers=3, num_refiner_layers=1, num_heads=4, head_dim=8)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def z_call(pipe, prompt=Z_PROMPTS, steps=2, **kwargs):
    args = dict(prompt=prompt, num_inference_steps=steps, guidance_scale=0.0, height=32, width=32,
                output_type="latent", generator=torch.Generator().manual_seed(0))
    # the pipeline rewrites prompt lists in place (its chat template): hand it copies
    return pipe(**{k: list(v) if isinstance(v, list) else v for k, v in {**args, **kwargs}.items()}).images


def z_stock(attn, hidden, mask, freqs):
    """(output, input of to_out) of the stock module on these rows."""
    return stock(attn, dict(hidden_states=hidden, attention_mask=mask, freqs_cis=freqs))


@pytest.mark.parametrize("negative,layer,cfg", [(Z_LONG, 1, False), ("blue", 0, True), (Z_LONG, 2, True)])
def test_z_image_layer_equals_stock_attention_on_both_texts(z_pipe, negative, layer, cfg, monkeypatch):
    """The row path. Z⁺: the stock module on the positive rows; Z⁻: on the positive rows' image segment with the
    negative rows' caption segment, rotary positions and key mask; NAG combines the image segment (64 tokens) only."""
    from dit_attn.hooks import nag_tokens

    monkeypatch.setattr(nag_tokens, "TOKEN_FAMILIES", ())  # the token path equals it: tests below
    modules = [block.attention for block in z_pipe.transformer.layers]
    kwargs = dict(guidance_scale=3.0, negative_prompt=["a green cat"] * len(Z_PROMPTS)) if cfg else {}
    with Recorder(z_pipe.transformer, modules) as rec, da.apply(z_pipe, da.NAG(negative, layers=[layer], **SETTINGS)):
        z_call(z_pipe, **kwargs)
    n, segment = len(Z_PROMPTS), 64
    rows = 3 * n if cfg else 2 * n
    cond, neg = list(range(n)), list(range(rows - n, rows))
    assert rec.calls == 1 and len(rec.records[layer]) == 2
    attn, ratios = modules[layer], []
    for inputs, out, _ in rec.records[layer]:
        hidden, mask, freqs = inputs["hidden_states"], inputs["attention_mask"], inputs["freqs_cis"]
        assert hidden.shape[0] == rows and (mask is not None) == (negative == Z_LONG)
        take = lambda x, r: x[r] if x is not None else None  # noqa: E731
        pos_out, zp = z_stock(attn, hidden[cond], take(mask, cond), freqs[cond])
        mixed_in = torch.cat([hidden[cond, :segment], hidden[neg, segment:]], dim=1)
        neg_out, zn = z_stock(attn, mixed_in, take(mask, neg), freqs[neg])
        mixed, ratio = nag_formula(zp[:, :segment], zn[:, :segment], **SETTINGS)
        want = attn.to_out[1](attn.to_out[0](torch.cat([mixed, zp[:, segment:]], dim=1)))
        assert (out[cond] - want).abs().max() <= ROUNDING
        assert (want - pos_out).abs().max() > 1e-3
        assert (out[neg, segment:] - neg_out[:, segment:]).abs().max() <= ROUNDING  # the negative text's own stream
        if cfg:  # CFG's negative rows: stock
            middle = list(range(n, 2 * n))
            assert (out[middle] - z_stock(attn, hidden[middle], take(mask, middle), freqs[middle])[0]).abs().max() <= ROUNDING
        ratios.append(ratio.flatten())
    assert bool((torch.cat(ratios) > SETTINGS["tau"]).any())


def test_z_image_scale_one_alpha_zero_and_call_count(z_pipe):
    kwargs = dict(guidance_scale=3.0, negative_prompt=["a green cat"] * len(Z_PROMPTS))
    with CallRecorder(z_pipe) as before:
        want = z_call(z_pipe, **kwargs)
    for edit in (da.NAG(Z_LONG, scale=1), da.NAG(Z_LONG, alpha=0)):
        with da.apply(z_pipe, edit):
            assert torch.equal(z_call(z_pipe, **kwargs), want)
    with CallRecorder(z_pipe) as rec, da.apply(z_pipe, da.NAG(Z_LONG)):
        guided = z_call(z_pipe, **kwargs)
    assert len(rec.calls) == len(before.calls) == 2 and (guided - want).abs().max() > 1e-3


# prompts whose captions pad to 32 and 64 tokens, under a negative caption of 32 ("blue") or 64 (Z_LONG)
Z_MIXED = ["a red circle", "a cat " + Z_LONG]


@pytest.mark.parametrize("negative,layer,cfg", [(Z_LONG, 0, False), ("blue", 1, True)])
def test_z_image_token_path_layer_equals_stock_attention_on_both_texts(z_pipe, negative, layer, cfg):
    """A row is [image ; caption ; negative caption]. Z⁺: the stock module on [image ; caption] with the call's
    rotary table and key mask; Z⁻: on [image ; negative caption]; the image segment of the guided rows combined,
    the captions' outputs their own attention's; CFG's unconditional rows stock."""
    modules = [block.attention for block in z_pipe.transformer.layers]
    kwargs = dict(guidance_scale=3.0, negative_prompt=["a green cat"] * 2) if cfg else {}
    with Recorder(z_pipe.transformer, modules) as rec, da.apply(z_pipe, da.NAG(negative, layers=[0, 1], **SETTINGS)):
        z_call(z_pipe, prompt=Z_MIXED, **kwargs)
    segment, stock_len, negative_len = 64, 64 + 64, 64 if negative == Z_LONG else 32
    rows = 4 if cfg else 2
    attn, ratios = modules[layer], []
    assert rec.calls == 1 and len(rec.records[layer]) == 2
    for inputs, out, _ in rec.records[layer]:
        hidden, mask, freqs = inputs["hidden_states"], inputs["attention_mask"], inputs["freqs_cis"]
        assert hidden.shape[:2] == (rows, stock_len + negative_len) and mask.shape == hidden.shape[:2]
        assert not bool(mask[0, segment + 32 : stock_len].any()) and bool(mask[:, stock_len:].all())
        parts = lambda x: torch.cat([x[:, :segment], x[:, stock_len:]], dim=1)  # noqa: E731
        pos_out, zp = z_stock(attn, hidden[:, :stock_len], mask[:, :stock_len], freqs[:, :stock_len])
        neg_out, zn = z_stock(attn, parts(hidden), parts(mask), parts(freqs))
        mixed, ratio = nag_formula(zp[:2, :segment], zn[:2, :segment], **SETTINGS)
        want = attn.to_out[0](torch.cat([mixed, zp[:2, segment:]], dim=1))
        assert (out[:2, :stock_len] - want).abs().max() <= ROUNDING
        assert (want - pos_out[:2]).abs().max() > 1e-3
        assert (out[:, stock_len:] - neg_out[:, segment:]).abs().max() <= ROUNDING  # the negative caption's stream
        if cfg:
            assert (out[2:, :stock_len] - pos_out[2:]).abs().max() <= ROUNDING
        ratios.append(ratio.flatten())
    assert bool((torch.cat(ratios) > SETTINGS["tau"]).any())


# all layers; the first two, CFG on, the image keys' part in two attention calls (as on a GPU); with LocalAttention
@pytest.mark.parametrize("negative,layers,cfg,local", [(Z_LONG, None, False, False), ("blue", (0, 1), True, False),
                                                       ("blue", None, False, True)])
def test_z_image_token_path_equals_row_path(z_pipe, negative, layers, cfg, local, monkeypatch):
    """Captions shorter and longer than the negative one (its rotary positions shift both ways): the token path's
    steps equal the row path's; its calls keep the stock rows and append the negative caption segment to each row."""
    from dit_attn.hooks import nag_tokens_flux

    monkeypatch.setattr(nag_tokens_flux, "SHARED_IMAGE_KEYS_FROM", 0 if layers is None else None)
    kwargs = dict(guidance_scale=3.0, negative_prompt=["a green cat"] * 2) if cfg else {}
    edits = (da.LocalAttention(radius=1, layers=[0, 2]),) if local else ()
    # the second block: its stream comes from the first, with the negative caption
    stock_calls, token_calls, row_calls = three_runs(
        z_pipe, lambda: z_call(z_pipe, prompt=Z_MIXED, **kwargs), z_pipe.transformer.layers[1],
        lambda a, k: tuple(a[0].shape[:2]), da.NAG(negative, layers=layers, **SETTINGS), monkeypatch, edits)
    negative_len = 64 if negative == Z_LONG else 32
    assert token_calls == [(b, s + negative_len) for b, s in stock_calls]
    assert [b for b, _ in row_calls] == [b + 2 for b, _ in stock_calls]


def test_z_image_shared_image_keys_under_caption_masks(z_pipe, monkeypatch):
    """Captions padded to different lengths: the image keys' part of Z⁺ and Z⁻ computed once, each caption's part
    under its key mask, gives the two attention calls' steps and the row path's (and the merge runs)."""
    # two SDPA calls at each of 3 NAG layers, 2 steps
    check_shared_image_keys(z_pipe, lambda: z_call(z_pipe, prompt=Z_MIXED), da.NAG("blue", **SETTINGS), 2 * 3 * 2,
                            monkeypatch)


# ---------------------------------------------------------------- HunyuanImage 2.1: [image ; text], masks per row
@pytest.fixture(scope="module")
def hy_distilled():
    from dit_attn.toy.hunyuan_image import build_hunyuan_image_pipeline

    pipe = build_hunyuan_image_pipeline(num_layers=2, num_single_layers=2, num_heads=4, head_dim=8, guidance_embeds=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def hy_guider():
    from dit_attn.toy.hunyuan_image import build_hunyuan_image_pipeline

    pipe = build_hunyuan_image_pipeline(num_layers=2, num_single_layers=2, num_heads=4, head_dim=8, seed=1)
    pipe.set_progress_bar_config(disable=True)
    return pipe


HY_PROMPTS = ['a red circle "OK"', "a cat"]  # quoted text: glyph states ride with the rows


def hy_call(pipe, prompt=HY_PROMPTS, steps=2, **kwargs):
    args = dict(prompt=prompt, num_inference_steps=steps, height=32, width=32, output_type="latent",
                generator=torch.Generator().manual_seed(0))
    if pipe.transformer.config.guidance_embeds:
        args["distilled_guidance_scale"] = 3.25
    return pipe(**{**args, **kwargs}).images


def hy_stock(attn, hidden, text, mask, rotary):
    """(image output, text output, Z: the image attention output before to_out) of the stock module."""
    kwargs = dict(hidden_states=hidden, encoder_hidden_states=text, attention_mask=mask, image_rotary_emb=rotary)
    if attn.to_out is None:  # single blocks: the raw attention outputs
        with torch.no_grad():
            image, text_out = attn(**kwargs)
        return image, text_out, image
    (image, text_out), z = stock(attn, kwargs)
    return image, text_out, z


def assert_unguided_calls_stock(attn, records, unguided) -> None:
    """The recorded outputs of the guider's unconditional calls (`unguided(inputs)`) are the stock module's
    (HunyuanImage 2.1, HunyuanVideo 1.5)."""
    for inputs, out, _ in records:
        if unguided(inputs):
            h, e, m, rot = (inputs[k] for k in ("hidden_states", "encoder_hidden_states", "attention_mask", "image_rotary_emb"))
            image, text, _ = hy_stock(attn, h, e, m, rot)
            assert torch.equal(out[0], image) and torch.equal(out[1], text)


@pytest.mark.parametrize("fixture,layer", [("hy_distilled", 1), ("hy_distilled", 3), ("hy_guider", 2)])
def test_hunyuan_image_layer_equals_stock_attention_on_both_texts(fixture, layer, request):
    """Double (1) and single (2, 3) blocks: Z⁻ is the stock module on the positive rows' image with the negative
    rows' text and text mask; with the guider's CFG the "pred_uncond" call runs stock and unwidened."""
    pipe = request.getfixturevalue(fixture)
    t = pipe.transformer
    modules = [b.attn for b in list(t.transformer_blocks) + list(t.single_transformer_blocks)]
    with Recorder(t, modules) as rec, da.apply(pipe, da.NAG("a blue square", layers=[layer], **SETTINGS)):
        hy_call(pipe)
    n, attn = len(HY_PROMPTS), modules[layer]
    cond, neg = list(range(n)), list(range(n, 2 * n))
    guided = [r for r in rec.records[layer] if r[0]["hidden_states"].shape[0] == 2 * n]
    assert len(guided) == 2 and rec.calls == (3 if fixture == "hy_guider" else 1)
    ratios = []
    for inputs, out, _ in guided:
        h, e, m, rot = (inputs[k] for k in ("hidden_states", "encoder_hidden_states", "attention_mask", "image_rotary_emb"))
        assert not bool(m[cond].all()) and not torch.equal(m[cond], m[neg])  # every row has its own text mask
        pos_image, pos_text, zp = hy_stock(attn, h[cond], e[cond], m[cond], rot)
        _, neg_text, zn = hy_stock(attn, h[cond], e[neg], m[neg], rot)
        mixed, ratio = nag_formula(zp, zn, **SETTINGS)
        want = mixed if attn.to_out is None else attn.to_out[1](attn.to_out[0](mixed))
        assert (out[0][cond] - want).abs().max() <= ROUNDING and (want - pos_image).abs().max() > 1e-3
        assert (out[1][cond] - pos_text).abs().max() <= ROUNDING
        assert (out[1][neg] - neg_text).abs().max() <= ROUNDING
        ratios.append(ratio.flatten())
    assert bool((torch.cat(ratios) > SETTINGS["tau"]).any())
    assert_unguided_calls_stock(attn, rec.records[layer], lambda inputs: inputs["hidden_states"].shape[0] == n)


@pytest.mark.parametrize("fixture", ["hy_distilled", "hy_guider"])
def test_hunyuan_image_scale_one_alpha_zero_and_call_count(fixture, request):
    pipe = request.getfixturevalue(fixture)
    with CallRecorder(pipe) as before:
        want = hy_call(pipe)
    for edit in (da.NAG("a blue square", scale=1), da.NAG("a blue square", alpha=0)):
        with da.apply(pipe, edit):
            assert torch.equal(hy_call(pipe), want)
    with CallRecorder(pipe) as rec, da.apply(pipe, da.NAG("a blue square")):
        guided = hy_call(pipe)
    assert len(rec.calls) == len(before.calls) and (guided - want).abs().max() > 1e-3


HY_NEGATIVE = 'a blue square "NO"'  # glyph states and a glyph mask of its own


@pytest.mark.parametrize("fixture,layer", [("hy_distilled", 1), ("hy_guider", 2)])
def test_hunyuan_image_token_path_layer_equals_stock_attention_on_both_texts(fixture, layer, request):
    """Each row's text is [text ; negative text] in a double (1) and a single (2) block. Z⁺: the stock module on the
    image with the row's text and key mask; Z⁻: with the negative text and its key mask; the text outputs their
    own; the guider's "pred_uncond" call stock, without the negative text."""
    pipe = request.getfixturevalue(fixture)
    t = pipe.transformer
    modules = [b.attn for b in list(t.transformer_blocks) + list(t.single_transformer_blocks)]
    with Recorder(t, modules) as rec, da.apply(pipe, da.NAG(HY_NEGATIVE, layers=[0, 1, 2], **SETTINGS)):
        hy_call(pipe)
    attn, ratios = modules[layer], []
    assert rec.calls == (3 if fixture == "hy_guider" else 1)
    guided = [r for r in rec.records[layer] if r[0]["encoder_hidden_states"].shape[1] > 32]
    assert len(guided) == 2 and len(rec.records[layer]) == (4 if fixture == "hy_guider" else 2)
    for inputs, out, _ in guided:
        h, e, m, rot = (inputs[k] for k in ("hidden_states", "encoder_hidden_states", "attention_mask", "image_rotary_emb"))
        image, text = h.shape[1], e.shape[1] // 2
        assert h.shape[0] == len(HY_PROMPTS) and not torch.equal(m[..., image : image + text], m[..., image + text:])
        pos_image, pos_text, zp = hy_stock(attn, h, e[:, :text], m[..., : image + text], rot)
        neg_mask = torch.cat([m[..., :image], m[..., image + text:]], dim=-1)
        _, neg_text, zn = hy_stock(attn, h, e[:, text:], neg_mask, rot)
        mixed, ratio = nag_formula(zp, zn, **SETTINGS)
        want = mixed if attn.to_out is None else attn.to_out[1](attn.to_out[0](mixed))
        assert (out[0] - want).abs().max() <= ROUNDING and (want - pos_image).abs().max() > 1e-3
        assert (out[1] - torch.cat([pos_text, neg_text], dim=1)).abs().max() <= ROUNDING
        ratios.append(ratio.flatten())
    assert bool((torch.cat(ratios) > SETTINGS["tau"]).any())
    assert_unguided_calls_stock(attn, rec.records[layer], lambda inputs: inputs["encoder_hidden_states"].shape[1] <= 32)


# all layers; a double and a single block, two attention calls (as on a GPU); all layers with LocalAttention
@pytest.mark.parametrize("fixture,layers,local", [("hy_distilled", None, False), ("hy_guider", (0, 1, 2), False),
                                                  ("hy_distilled", None, True)])
def test_hunyuan_image_token_path_equals_row_path(fixture, layers, local, request, monkeypatch):
    """Prompts and a negative prompt with and without glyph text: the token path's steps equal the row path's; its
    guided calls keep the stock rows and carry twice the text."""
    from dit_attn.hooks import nag_tokens_flux

    pipe = request.getfixturevalue(fixture)
    monkeypatch.setattr(nag_tokens_flux, "SHARED_IMAGE_KEYS_FROM", 0 if layers is None else None)
    edits = (da.LocalAttention(radius=1, layers=[0, 2]),) if local else ()
    size = dict(height=64, width=64) if local else {}
    calls = three_runs(pipe, lambda: hy_call(pipe, **size), pipe.transformer.single_transformer_blocks[0],
                       lambda a, k: (a[0].shape[0], a[1].shape[1]), da.NAG(HY_NEGATIVE, layers=layers, **SETTINGS),
                       monkeypatch, edits)
    assert_text_doubled(*calls, fixture == "hy_guider")


def test_hunyuan_image_shared_image_keys_under_text_masks(hy_distilled, monkeypatch):
    """Padded prompts: the image keys' part of Z⁺ and Z⁻ computed once, each text's part under its key mask,
    gives the two attention calls' steps and the row path's (and the merge runs)."""
    # two SDPA calls at each of 4 NAG layers, 2 steps
    check_shared_image_keys(hy_distilled, lambda: hy_call(hy_distilled), da.NAG(HY_NEGATIVE, **SETTINGS), 2 * 4 * 2,
                            monkeypatch)


# ---------------------------------------------------------------- Qwen-Image-Edit: reference tokens in the image stream
@pytest.fixture(scope="module")
def qwen_edit():
    """The pipeline's 1024² reference area shrunk to 32²: 16 generated + 16 reference image tokens."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit_module

    from dit_attn.toy.qwen_image import build_qwen_image_edit_pipeline

    original = edit_module.calculate_dimensions
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(edit_module, "calculate_dimensions", lambda area, ratio: original(32 * 32, ratio))
        pipe = build_qwen_image_edit_pipeline(num_layers=3, num_heads=4, head_dim=16)
        pipe.set_progress_bar_config(disable=True)
        yield pipe


def edit_image():
    from PIL import Image

    return Image.fromarray((torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(2)) * 255).byte().numpy())


def edit_call(pipe, steps=2, **kwargs):
    args = dict(image=edit_image(), prompt="a red circle", num_inference_steps=steps, true_cfg_scale=1.0, height=32, width=32,
                output_type="latent", generator=torch.Generator().manual_seed(0), num_images_per_prompt=2)
    return pipe(**{**args, **kwargs}).images


@pytest.mark.parametrize("layer,cfg", [(0, False), (2, True)])
def test_qwen_image_edit_layer_equals_stock_attention_on_both_texts(qwen_edit, layer, cfg, monkeypatch):
    """The negative prompt is encoded with the reference image; its rows take the positive rows' whole image
    stream (generated and reference tokens), and every image query's output is combined (the row path)."""
    from dit_attn.hooks import nag_tokens

    monkeypatch.setattr(nag_tokens, "TOKEN_FAMILIES", ())
    modules = attention_modules(qwen_edit)
    kwargs = dict(true_cfg_scale=3.0, negative_prompt="a green cat") if cfg else {}
    texts = []  # the call's text states as the transformer gets them
    hook = qwen_edit.transformer.txt_norm.register_forward_pre_hook(lambda m, a: texts.append(a[0].clone()))
    try:
        with Recorder(qwen_edit.transformer, modules) as rec, da.apply(qwen_edit, da.NAG("blue", layers=[layer], **SETTINGS)):
            edit_call(qwen_edit, **kwargs)
    finally:
        hook.remove()
    n = 2
    guided = [r[:2] for r in rec.records[layer] if r[0]["hidden_states"].shape[0] == 2 * n]
    assert len(guided) == 2 and guided[0][0]["hidden_states"].shape[1] == 32
    assert rec.calls == (3 if cfg else 1)
    text_len = guided[0][0]["encoder_hidden_states"].shape[1]
    own, _ = family_of(qwen_edit.transformer).encode_prompts(qwen_edit, ["blue"], text_len, image=edit_image())
    assert torch.equal(texts[0][n:], own.expand(n, -1, -1))  # the negative prompt encoded with the reference image
    ratios = torch.cat([check_layer(modules[layer], kw, out, n, text_len, False) for kw, out in guided])
    assert bool((ratios > SETTINGS["tau"]).any())


# ---------------------------------------------------------------- LongCat-Image, Ovis-Image, Bria: FLUX.1's processor
def flux_clone(name):
    """A FLUX.1-math family's tiny pipeline with its own (tiny) text encoder, and its call."""
    from dit_attn.toy.bria import build_bria_pipeline
    from dit_attn.toy.longcat_image import build_longcat_image_pipeline
    from dit_attn.toy.ovis_image import build_ovis_image_pipeline

    build = {"longcat": build_longcat_image_pipeline, "ovis": build_ovis_image_pipeline, "bria": build_bria_pipeline}[name]
    pipe = build(num_layers=1, num_single_layers=2, num_heads=4, head_dim=16, text_encoder=True)
    pipe.set_progress_bar_config(disable=True)
    extra = dict(enable_prompt_rewrite=False) if name == "longcat" else dict(max_sequence_length=12)

    def call(prompt="a red circle", steps=2, **kwargs):
        args = dict(prompt=prompt, num_inference_steps=steps, guidance_scale=1.0, height=32, width=32, output_type="latent",
                    generator=torch.Generator().manual_seed(0), **extra)
        return pipe(**{**args, **kwargs}).images

    return pipe, call


@pytest.fixture(scope="module", params=["longcat", "ovis", "bria"])
def clone(request):
    return request.param, *flux_clone(request.param)


@pytest.mark.parametrize("layer,cfg", [(0, False), (2, True)])  # a double block without CFG, a single block with it
def test_flux_clones_layer_equals_stock_attention_on_both_texts(clone, layer, cfg, monkeypatch):
    from dit_attn.hooks import nag_tokens

    from .test_nag import check_layer as flux_check_layer

    monkeypatch.setattr(nag_tokens, "TOKEN_FAMILIES", ())  # the row path (the token path equals it: test below)

    name, pipe, call = clone
    attn = flux_attention_module(pipe, layer)
    kwargs = dict(guidance_scale=3.0, negative_prompt="a green cat") if cfg else {}
    with Recorder(pipe.transformer, [attn]) as rec, da.apply(pipe, da.NAG("a blue square", layers=[layer], **SETTINGS)):
        call(num_images_per_prompt=2, **kwargs)
    n, cfg_in_call = 2, cfg and name == "bria"  # Bria's CFG is one call [uncond ; cond]; the others' a second call
    stock_rows = 2 * n if cfg_in_call else n
    cond = list(range(stock_rows - n, stock_rows))
    guided = [r[:2] for r in rec.records[0] if r[0]["hidden_states"].shape[0] == stock_rows + n]
    assert len(guided) == 2 and rec.calls == (3 if cfg and not cfg_in_call else 1)
    text_len = pipe.tokenizer_max_length if name == "longcat" else 12
    single = layer >= len(pipe.transformer.transformer_blocks)
    ratios = [flux_check_layer(attn, kw, out, stock_rows, cond, text_len, slice(text_len, None), single) for kw, out in guided]
    assert bool((torch.cat(ratios) > SETTINGS["tau"]).any())


def test_flux_clones_scale_one_alpha_zero_and_call_count(clone):
    name, pipe, call = clone
    kwargs = dict(guidance_scale=3.0, negative_prompt="a green cat")
    with CallRecorder(pipe) as before:
        want = call(**kwargs)
    for edit in (da.NAG("a blue square", scale=1), da.NAG("a blue square", alpha=0)):
        with da.apply(pipe, edit):
            assert torch.equal(call(**kwargs), want)
    with CallRecorder(pipe) as rec, da.apply(pipe, da.NAG("a blue square")):
        guided = call(**kwargs)
    assert len(rec.calls) == len(before.calls) == (2 if name == "bria" else 4) and (guided - want).abs().max() > 1e-3


@pytest.mark.parametrize("layers,cfg", [(None, False), ((0, 1), True)])  # all layers; a double and a single block, CFG on
def test_flux_clones_token_path_equals_row_path(clone, layers, cfg, monkeypatch):
    """NAG with the negative text as extra tokens of each row gives the row path's steps; the guided calls keep the
    stock rows and carry twice the text (Bria's batched CFG call too: its unconditional rows carry the negative
    tokens unguided), the unconditional calls of the others are stock."""
    name, pipe, call = clone
    kwargs = dict(guidance_scale=3.0, negative_prompt="a green cat") if cfg else {}
    check_token_path_equals_row_path(pipe, call, layers, kwargs, cfg and name != "bria", monkeypatch)


# all layers, with LocalAttention (radius 1 on the 4×4 grid) windowing both calls; the first double block (the second
# hands the negative tokens on) with two attention calls (as on a GPU); both doubles and a single block, with a
# reference image (its tokens follow the generated ones)
@pytest.mark.parametrize("layers,cfg,reference", [(None, False, False), ((0,), True, False), ((0, 1, 2), False, True)])
def test_flux2_token_path_equals_row_path(klein, layers, cfg, reference, monkeypatch):
    import numpy as np
    from PIL import Image

    from dit_attn.hooks import nag_tokens_flux

    monkeypatch.setattr(nag_tokens_flux, "SHARED_IMAGE_KEYS_FROM", None if layers == (0,) else 0)
    kwargs = dict(CFG["klein"]) if cfg else {}
    if reference:
        kwargs["image"] = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    local = () if layers is not None else (da.LocalAttention(radius=1, layers=[0, 3]),)
    if local:
        kwargs.update(height=64, width=64)
    check_token_path_equals_row_path(klein, lambda **k: klein_call(klein, **k), layers, kwargs, cfg, monkeypatch, local)


# all layers; the first block, CFG on (its unconditional call stock); the first two, with LocalAttention
@pytest.mark.parametrize("layers,cfg,local", [(None, False, False), ((0,), True, False), ((0, 1), False, True)])
def test_qwen_token_path_equals_row_path(qwen, layers, cfg, local, monkeypatch):
    """Prompts of different lengths (every row's text mask matters, the negative prompt's own too)."""
    kwargs = dict(CFG["qwen"]) if cfg else {}
    edits = (da.LocalAttention(radius=1, layers=[0, 2]),) if local else ()
    if local:
        kwargs.update(height=64, width=64)
    check_token_path_equals_row_path(qwen, lambda **k: qwen_call(qwen, **k), layers, kwargs, cfg, monkeypatch, edits,
                                     prompts=QWEN_PROMPTS)


def test_qwen_shared_image_keys_under_text_masks(qwen, monkeypatch):
    """Padded prompts and a padded negative prompt: the image keys' part of Z⁺ and Z⁻ computed once, each text's
    part under its own key mask, gives the two attention calls' steps and the row path's (and the merge runs)."""
    # two SDPA calls at each of 3 NAG layers, 2 steps
    check_shared_image_keys(qwen, lambda: qwen_call(qwen), da.NAG("blue", **SETTINGS), 2 * 3 * 2, monkeypatch)


@pytest.mark.parametrize("layers", [None, (0, 1)])
def test_qwen_image_edit_token_path_equals_row_path(qwen_edit, layers, monkeypatch):
    """The negative text encoded with the reference image; every image query, generated and reference, combined."""
    check_token_path_equals_row_path(qwen_edit, lambda **k: edit_call(qwen_edit, **k), layers, {}, False, monkeypatch,
                                     prompts="a red circle")


def check_token_path_equals_row_path(pipe, call, layers, kwargs: dict, separate_cfg: bool, monkeypatch, edits=(),
                                     prompts=("a red circle", "a green square")):
    """The token path's steps equal the row path's (with `edits` beside NAG); both differ from stock."""
    prompt = list(prompts) if isinstance(prompts, tuple | list) else prompts
    calls = three_runs(pipe, lambda: call(prompt=prompt, **kwargs), pipe.transformer.transformer_blocks[0],
                       lambda a, k: (k["hidden_states"].shape[0], k["encoder_hidden_states"].shape[1]),
                       da.NAG("a blue square", layers=layers, **SETTINGS), monkeypatch, edits)
    assert_text_doubled(*calls, separate_cfg)


def three_runs(pipe, call, block, shape_of, nag, monkeypatch, edits=()):
    """The stock run (with `edits`), NAG's token path and its row path (`edits` beside NAG): the token path's steps
    equal the row path's, and differ from stock. (What `shape_of(args, kwargs)` reads from `block`'s inputs at each
    call, in the stock run, on the token path, on the row path.)"""
    from dit_attn.hooks import nag_tokens

    def run(*applied):
        seen = []
        hook = block.register_forward_pre_hook(lambda m, a, k: seen.append(shape_of(a, k)), with_kwargs=True)
        try:
            with CallRecorder(pipe) as rec, (da.apply(pipe, *applied) if applied else contextlib.nullcontext()):
                call()
        finally:
            hook.remove()
        return rec.steps, seen

    stock, stock_calls = run(*edits)
    tokens, token_calls = run(nag, *edits)
    monkeypatch.setattr(nag_tokens, "TOKEN_FAMILIES", ())
    rows, row_calls = run(nag, *edits)
    for got, want in zip(tokens, rows, strict=True):
        assert (got - want).abs().max() <= 1e-5
    assert max((got - s).abs().max() for got, s in zip(tokens, stock)) > 1e-3
    assert len(token_calls) == len(row_calls) == len(stock_calls)
    return stock_calls, token_calls, row_calls


def assert_text_doubled(stock_calls, token_calls, row_calls, separate_cfg: bool) -> None:
    """(rows, text tokens) at a block: the token path's guided calls keep the stock rows and carry twice the text,
    the row path's carry two more rows; with CFG in separate calls, the unconditional calls are stock."""
    guided = slice(0, None, 2) if separate_cfg else slice(None)
    assert token_calls[guided] == [(b, 2 * n) for b, n in stock_calls[guided]]
    assert row_calls[guided] == [(b + 2, n) for b, n in stock_calls[guided]]
    if separate_cfg:
        assert token_calls[1::2] == row_calls[1::2] == stock_calls[1::2]


@pytest.mark.parametrize("name,kind", [("z_image", "cross"), ("hunyuan_image", "self"), ("hunyuan_video15", "cross")])
def test_capture_with_nag_token_path_equals_row_path(name, kind, request, monkeypatch):
    """Attention maps recorded beside NAG: on the token path, the conditional rows' attention over their own text
    (cross) or image (self), as on the row path."""
    from dit_attn.hooks import nag_tokens

    pipe, call, _ = _composition_case(name, request)
    capture = da.Capture(kind=kind, layers=[0, 1], tokens=None if kind == "cross" else [0])

    def maps():
        with da.apply(pipe, capture, da.NAG("a blue square", **SETTINGS)) as handle:
            call(pipe, prompt=["a red circle"], steps=2)
            return handle.maps

    tokens = maps()
    monkeypatch.setattr(nag_tokens, "TOKEN_FAMILIES", ())
    rows = maps()
    assert tokens.maps.shape == rows.maps.shape and tokens.tokens == rows.tokens
    assert (tokens.maps - rows.maps).abs().max() <= 1e-6


# ---------------------------------------------------------------- NAG with HeadGuidance
def _composition_case(name, request):
    """(pipeline, its call of one step, two heads) of a family."""
    if name == "flux2_klein":
        return request.getfixturevalue("klein"), klein_call, ["L1H2", "L2H0"]
    if name == "z_image":
        return request.getfixturevalue("z_pipe"), z_call, ["L1H2", "L2H0"]
    if name == "hunyuan_image":
        return request.getfixturevalue("hy_distilled"), hy_call, ["L1H2", "L2H0"]
    if name == "qwen_image_edit":
        return request.getfixturevalue("qwen_edit"), edit_call, ["L1H2", "L2H0"]
    if name == "hunyuan_video15":
        return request.getfixturevalue("hv_t2v"), hv_call, ["L0H2", "L1H0"]
    pipe, call = flux_clone(name)
    return pipe, call, ["L0H2", "L2H0"]


@pytest.mark.parametrize("name", ["z_image", "hunyuan_image", "qwen_image_edit", "bria", "hunyuan_video15", "flux2_klein"])
def test_with_head_guidance_equals_explicit(name, request):
    """One step, CFG off: ε = ε_c + s·(ε_c − ε_p), ε_c from NAG alone, ε_p from NAG with the heads perturbed in
    every row (HeadGuidance's copies carry their negative rows, perturbed too)."""
    pipe, call, heads = _composition_case(name, request)
    s, eps = 2.0, {}
    for key, edits in (("guided", (da.HeadGuidance(heads=heads, scale=s),)), ("c", ()), ("p", (da.SoftPAG(heads=heads, u=1.0),))):
        with CallRecorder(pipe) as rec, da.apply(pipe, da.NAG("a blue square", **SETTINGS), *edits):
            call(pipe, steps=1) if name != "bria" else call(steps=1)
        eps[key] = rec.steps[0]
    assert (eps["c"] - eps["p"]).abs().max() > 1e-3
    assert (eps["guided"] - (eps["c"] + s * (eps["c"] - eps["p"]))).abs().max() <= 3 * ROUNDING


def test_cli_generate_with_nag_on_a_saved_z_image_pipeline(tmp_path):
    """The distilled setting (Z-Image-Turbo runs without CFG): `--nag-negative` on a local Z-Image directory."""
    import json

    from PIL import Image

    from dit_attn.cli import main
    from dit_attn.toy.z_image import build_z_image_pipeline

    model = tmp_path / "model"
    build_z_image_pipeline().save_pretrained(model)
    args = ["generate", "a red circle", "--model", str(model), "--steps", "2", "--size", "32", "--seed", "3",
            "--guidance-scale", "0", "--out"]
    assert main([*args, str(tmp_path / "plain")]) == 0
    assert main([*args, str(tmp_path / "nag"), "--nag-negative", "blue", "--nag-scale", "3"]) == 0
    plain, guided = (Image.open(next((tmp_path / name).glob("*.png"))) for name in ("plain", "nag"))
    assert json.loads(guided.text["dit-attn"])["edits"] == [da.NAG("blue", scale=3.0).to_dict()]
    assert plain.tobytes() != guided.tobytes()


# ---------------------------------------------------------------- HunyuanVideo 1.5: [video ; context], masks per row
@pytest.fixture(scope="module")
def hv_t2v():
    from dit_attn.toy.hunyuan_video15 import build_hunyuan_video15_pipeline

    pipe = build_hunyuan_video15_pipeline(num_layers=2, num_heads=4, head_dim=8)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def hv_i2v():
    from dit_attn.toy.hunyuan_video15 import build_hunyuan_video15_i2v_pipeline

    pipe = build_hunyuan_video15_i2v_pipeline(num_layers=2, num_heads=4, head_dim=8, seed=1)
    pipe.set_progress_bar_config(disable=True)
    return pipe


HV_PROMPTS = ['a red circle "OK"', "a cat"]  # quoted text: glyph states ride with the rows


def hv_call(pipe, prompt=HV_PROMPTS, steps=2, cfg=1.0, **kwargs):
    from PIL import Image

    from dit_attn.toy.hunyuan_video15 import HUNYUAN_VIDEO15_RUN

    pipe.guider = pipe.guider.new(guidance_scale=cfg)  # 1.0: one call a step (the distilled setting)
    args = dict(prompt=prompt, num_inference_steps=steps, output_type="latent", generator=torch.Generator().manual_seed(0),
                **HUNYUAN_VIDEO15_RUN)
    if hasattr(pipe, "image_encoder"):  # image-to-video: height and width are the image's
        args = {k: v for k, v in args.items() if k not in ("height", "width")}
        args["image"] = Image.new("RGB", (16, 16), (200, 30, 30))
    return pipe(**{**args, **kwargs}).frames


@pytest.mark.parametrize("fixture,layer,cfg", [("hv_t2v", 0, 1.0), ("hv_t2v", 1, 4.0), ("hv_i2v", 1, 3.0)])
def test_hunyuan_video15_layer_equals_stock_attention_on_both_texts(fixture, layer, cfg, request, monkeypatch):
    """The row path. Z⁻ is the stock module on the positive rows' video with the negative rows' context (image
    context, glyphs and text, reordered by their own masks) and context mask; with CFG the "pred_uncond" call runs
    stock."""
    from dit_attn.hooks import nag_tokens

    monkeypatch.setattr(nag_tokens, "TOKEN_FAMILIES", ())  # the token path equals it: tests below
    pipe = request.getfixturevalue(fixture)
    t = pipe.transformer
    modules = [b.attn for b in t.transformer_blocks]
    with Recorder(t, modules) as rec, da.apply(pipe, da.NAG("a blue square", layers=[layer], **SETTINGS)):
        hv_call(pipe, cfg=cfg)
    n, attn = len(HV_PROMPTS), modules[layer]
    cond, neg = list(range(n)), list(range(n, 2 * n))
    guided = [r for r in rec.records[layer] if r[0]["hidden_states"].shape[0] == 2 * n]
    assert len(guided) == 2 and rec.calls == (1 if cfg == 1.0 else 3)
    ratios = []
    for inputs, out, _ in guided:
        h, e, m, rot = (inputs[k] for k in ("hidden_states", "encoder_hidden_states", "attention_mask", "image_rotary_emb"))
        assert not torch.equal(m[cond], m[neg])  # every row has its own context mask
        kwargs = dict(hidden_states=h[cond], image_rotary_emb=rot)
        (pos_video, pos_context), zp = stock(attn, dict(kwargs, encoder_hidden_states=e[cond], attention_mask=m[cond]))
        (_, neg_context), zn = stock(attn, dict(kwargs, encoder_hidden_states=e[neg], attention_mask=m[neg]))
        mixed, ratio = nag_formula(zp, zn, **SETTINGS)
        want = attn.to_out[1](attn.to_out[0](mixed))
        assert (out[0][cond] - want).abs().max() <= ROUNDING and (want - pos_video).abs().max() > 1e-3
        assert (out[1][cond] - pos_context).abs().max() <= ROUNDING
        assert (out[1][neg] - neg_context).abs().max() <= ROUNDING
        ratios.append(ratio.flatten())
    assert bool((torch.cat(ratios) > SETTINGS["tau"]).any())
    assert_unguided_calls_stock(attn, rec.records[layer], lambda inputs: inputs["hidden_states"].shape[0] == n)


HV_NEGATIVE = 'a blue square "NO"'


@pytest.mark.parametrize("fixture,layer,cfg", [("hv_t2v", 0, 1.0), ("hv_i2v", 1, 3.0)])
def test_hunyuan_video15_token_path_layer_equals_stock_attention_on_both_texts(fixture, layer, cfg, request):
    """Each row's context is [context ; negative context]. Z⁺: the stock module on the video with the row's context
    and mask; Z⁻: with the negative context (the row's image context, the negative glyphs and text) and its mask;
    the valid context tokens' outputs their own (the padding's are never read); "pred_uncond" stock."""
    pipe = request.getfixturevalue(fixture)
    modules = [b.attn for b in pipe.transformer.transformer_blocks]
    with Recorder(pipe.transformer, modules) as rec, da.apply(pipe, da.NAG(HV_NEGATIVE, layers=[0, 1], **SETTINGS)):
        hv_call(pipe, cfg=cfg)
    attn, ratios = modules[layer], []
    context = max(r[0]["attention_mask"].shape[1] for r in rec.records[layer]) // 2  # the guided calls' is twice
    guided = [r for r in rec.records[layer] if r[0]["attention_mask"].shape[1] == 2 * context]
    assert len(guided) == 2 and len(rec.records[layer]) == (2 if cfg == 1.0 else 4)
    for inputs, out, _ in guided:
        h, e, m, rot = (inputs[k] for k in ("hidden_states", "encoder_hidden_states", "attention_mask", "image_rotary_emb"))
        assert h.shape[0] == len(HV_PROMPTS) and not torch.equal(m[:, :context], m[:, context:])
        kwargs = dict(hidden_states=h, image_rotary_emb=rot)
        (pos_video, pos_context), zp = stock(attn, dict(kwargs, encoder_hidden_states=e[:, :context],
                                                        attention_mask=m[:, :context]))
        (_, neg_context), zn = stock(attn, dict(kwargs, encoder_hidden_states=e[:, context:],
                                                attention_mask=m[:, context:]))
        mixed, ratio = nag_formula(zp, zn, **SETTINGS)
        want = attn.to_out[1](attn.to_out[0](mixed))
        assert (out[0] - want).abs().max() <= ROUNDING and (want - pos_video).abs().max() > 1e-3
        valid = m.bool()
        assert (out[1][valid] - torch.cat([pos_context, neg_context], dim=1)[valid]).abs().max() <= ROUNDING
        ratios.append(ratio.flatten())
    assert bool((torch.cat(ratios) > SETTINGS["tau"]).any())
    assert_unguided_calls_stock(attn, rec.records[layer], lambda inputs: inputs["attention_mask"].shape[1] == context)


# all layers, text-to-video; the first block, image-to-video with CFG, two attention calls (as on a GPU)
@pytest.mark.parametrize("fixture,layers,cfg", [("hv_t2v", None, 1.0), ("hv_i2v", (0,), 3.0)])
def test_hunyuan_video15_token_path_equals_row_path(fixture, layers, cfg, request, monkeypatch):
    """The token path's steps equal the row path's; its guided calls keep the stock rows and carry twice the context."""
    from dit_attn.hooks import nag_tokens_flux

    pipe = request.getfixturevalue(fixture)
    monkeypatch.setattr(nag_tokens_flux, "SHARED_IMAGE_KEYS_FROM", 0 if layers is None else None)
    calls = three_runs(pipe, lambda: hv_call(pipe, cfg=cfg), pipe.transformer.transformer_blocks[-1],
                       lambda a, k: (a[0].shape[0], a[1].shape[1]), da.NAG(HV_NEGATIVE, layers=layers, **SETTINGS),
                       monkeypatch)
    assert_text_doubled(*calls, cfg != 1.0)


def test_hunyuan_video15_shared_image_keys_under_context_masks(hv_t2v, monkeypatch):
    """The video keys' part of Z⁺ and Z⁻ computed once, each context's part under its key mask, gives the two
    attention calls' steps and the row path's (and the merge runs)."""
    # two SDPA calls at each of 2 NAG layers, 2 steps
    check_shared_image_keys(hv_t2v, lambda: hv_call(hv_t2v), da.NAG(HV_NEGATIVE, **SETTINGS), 2 * 2 * 2, monkeypatch)


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_hunyuan_video15_scale_one_alpha_zero_and_call_count(hv_t2v, cfg):
    with CallRecorder(hv_t2v) as before:
        want = hv_call(hv_t2v, cfg=cfg)
    for edit in (da.NAG("a blue square", scale=1), da.NAG("a blue square", alpha=0)):
        with da.apply(hv_t2v, edit):
            assert torch.equal(hv_call(hv_t2v, cfg=cfg), want)
    with CallRecorder(hv_t2v) as rec, da.apply(hv_t2v, da.NAG("a blue square")):
        guided = hv_call(hv_t2v, cfg=cfg)
    assert len(rec.calls) == len(before.calls) == (2 if cfg == 1.0 else 4) and (guided - want).abs().max() > 1e-3


def test_cli_generate_with_nag_on_a_saved_hunyuan_video15_pipeline(tmp_path):
    """`--nag-negative` on a local HunyuanVideo 1.5 directory, CFG off: the frames of the API run with NAG."""
    import os

    import numpy as np
    from diffusers import DiffusionPipeline
    from diffusers.guiders import ClassifierFreeGuidance

    import dit_attn.video as video
    from dit_attn.cli import main
    from dit_attn.toy.hunyuan_video15 import build_hunyuan_video15_pipeline

    build_hunyuan_video15_pipeline().save_pretrained(tmp_path / "model")
    model, out = str(tmp_path / "model"), tmp_path / "out"
    assert main(["generate", "a red circle", "--model", model, "--steps", "2", "--size", "16", "--frames", "5",
                 "--seed", "3", "--guidance-scale", "1", "--nag-negative", "blue", "--nag-scale", "3",
                 "--video-format", "webp", "--out", str(out)]) == 0
    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    pipe.guider = ClassifierFreeGuidance(guidance_scale=1.0)
    run = lambda: pipe("a red circle", generator=torch.Generator().manual_seed(3), num_inference_steps=2,  # noqa: E731
                       height=16, width=16, num_frames=5, output_type="pil").frames[0]
    plain = run()
    with da.apply(pipe, da.NAG("blue", scale=3)):
        guided = run()
    written = [f for f in os.listdir(out) if f.endswith(".webp")]
    frames = video.read_video_frames(str(out / written[0]))
    assert len(written) == 1 and len(frames) == 5
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(frames, guided, strict=True))
    assert not all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(plain, guided))

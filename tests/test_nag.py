"""NAG checked against independent references: the stock attention modules run on the positive
and on the negative text, and a stock transformer whose SDPA calls a TorchFunctionMode turns
into the NAG combination."""
import functools

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import dit_attn as da

from .conftest import (CallRecorder, PerturbSDPA, check_shared_image_keys, flux_attention_module, flux_call, replay,
                       sd3_call)

# rows computed in a wider batch round differently (see test_localization); NAG moves outputs by ≥ 1e-3
ROUNDING = 2e-5
PROMPT, NEGATIVE = "a red circle", "a blue square"
SETTINGS = dict(scale=4.0, tau=1.2, alpha=0.5)  # tau low enough that the ratio clips on some tokens


def nag_formula(zp, zn, scale, tau, alpha, p=1):
    """(N, S, C) image outputs with the positive and the negative text → NAG's output, and the token ratios."""
    guided = scale * zp - (scale - 1) * zn
    ratio = guided.abs().pow(p).sum(-1, keepdim=True).pow(1 / p) / zp.abs().pow(p).sum(-1, keepdim=True).pow(1 / p)
    guided = torch.where(ratio > tau, guided * tau / ratio, guided)
    return alpha * guided + (1 - alpha) * zp, ratio


def test_combination_is_the_formula_on_every_token():
    """`nag_combination` against the paper's formula, both norms; a token whose Z⁺ is zero (ratio ∞: clipped to 0) or
    whose Z⁺ and Z̃ are both zero (0/0: left as is) included; the attention output's layout changes no bit."""
    from dit_attn.processors.state import NAGSetting, nag_combination

    generator = torch.Generator().manual_seed(0)
    zp, zn = (torch.randn(2, 6, 16, generator=generator) for _ in range(2))
    zn[1] = zp[1] + 0.01 * zn[1]  # Z⁻ near Z⁺: ratios near 1, not clipped
    zp[0, 0] = 0  # ratio ∞
    zp[0, 1], zn[0, 1] = 0, 0  # 0 / 0
    for norm, p in (("l1", 1), ("l2", 2)):
        setting = NAGSetting(frozenset(), scale=4.0, tau=1.2, alpha=0.5, norm=norm)
        want, ratio = nag_formula(zp, zn, 4.0, 1.2, 0.5, p)
        assert bool((ratio > 1.2).any()) and bool((ratio < 1.2).any())
        got = nag_combination(setting, zp, zn)
        assert torch.allclose(got, torch.nan_to_num(want), atol=1e-6) and bool(torch.isfinite(got).all())
        assert bool((got[0, :2] == 0).all())
        transposed = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (zp, zn)]  # channels strided
        assert torch.equal(nag_combination(setting, *transposed), got)
    assert nag_combination(setting, zp.bfloat16(), zn.bfloat16()).dtype == torch.bfloat16


def encode(pipe, prompt):
    with torch.no_grad():
        if "Flux" not in type(pipe).__name__:
            embeds, _, pooled, _ = pipe.encode_prompt(prompt, None, None, do_classifier_free_guidance=False, max_sequence_length=8)
        else:
            embeds, pooled, _ = pipe.encode_prompt(prompt, None, max_sequence_length=8)
    return embeds, pooled


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple):
        return tuple(_clone(v) for v in value)
    return value


def record_module(module):
    records = []

    def hook(m, args, kwargs, out):
        named = dict(zip(("hidden_states", "encoder_hidden_states"), args)) | kwargs
        records.append(({k: _clone(v) for k, v in named.items()}, _clone(out)))

    return module.register_forward_hook(hook, with_kwargs=True), records


def stock_attention(attn, kwargs):
    """(output, pre-projection image output or None) of the stock module on these inputs."""
    captured = {}
    to_out = getattr(attn, "to_out", None)
    handle = to_out[0].register_forward_pre_hook(lambda m, a: captured.__setitem__("z", a[0].clone())) if to_out is not None else None
    try:
        with torch.no_grad():
            out = attn(**kwargs)
    finally:
        if handle is not None:
            handle.remove()
    return out, captured.get("z")


def rows_of(kwargs, rows, text_rows=None, text_len=None):
    """The module inputs of `rows`; text tokens from `text_rows` instead (joint input when text_len is set)."""
    out = dict(kwargs)
    h = kwargs["hidden_states"]
    if text_len is None:
        out["hidden_states"] = h[rows]
        if kwargs.get("encoder_hidden_states") is not None:
            out["encoder_hidden_states"] = kwargs["encoder_hidden_states"][rows if text_rows is None else text_rows]
    else:
        text = h[rows if text_rows is None else text_rows, :text_len]
        out["hidden_states"] = torch.cat([text, h[rows, text_len:]], dim=1)
    if isinstance(kwargs.get("attention_mask"), torch.Tensor):  # Chroma: each row's text padding (same image part)
        out["attention_mask"] = kwargs["attention_mask"][rows if text_rows is None else text_rows]
    return out


def check_layer(attn, kwargs, out, stock_rows, cond, text_len, image, single):
    """One recorded NAG layer call against the stock module on the positive and on the negative text."""
    negative = list(range(stock_rows, stock_rows + len(cond)))
    split = (lambda o: (o[:, image], o[:, :text_len])) if single else (lambda o: o)
    pos_out, zp = stock_attention(attn, rows_of(kwargs, cond, text_len=text_len if single else None))
    neg_out, zn = stock_attention(attn, rows_of(kwargs, cond, negative, text_len if single else None))
    if single:
        zp, zn = pos_out[:, image], neg_out[:, image]
    mixed, ratio = nag_formula(zp, zn, **SETTINGS)
    got_image, got_text = split(out)
    want_image = mixed if single else attn.to_out[1](attn.to_out[0](mixed))
    pos_image, pos_text = split(pos_out)
    assert (got_image[cond] - want_image).abs().max() <= ROUNDING
    assert (want_image - pos_image).abs().max() > 1e-3  # the guidance does something
    # the positive rows' text stream is their stock one; the negative rows' text saw the positive image
    assert (got_text[cond] - pos_text).abs().max() <= ROUNDING
    assert (got_text[negative] - split(neg_out)[1]).abs().max() <= ROUNDING
    others = [i for i in range(stock_rows) if i not in cond]
    if others:
        stock_out, _ = stock_attention(attn, rows_of(kwargs, others, text_len=text_len if single else None))
        for got, want in zip(split(out), split(stock_out)):
            assert (got[others] - want).abs().max() <= ROUNDING
    return ratio.flatten()


@pytest.mark.parametrize("family,layer,cfg", [
    ("chroma", 0, None), ("chroma", 3, None),  # FLUX.1's processor under Chroma's text mask
    ("sd3", 1, 4.0), ("sd3", 1, 1.0), ("sd3", 2, 1.0),  # layer 2: the last block (context_pre_only)
    ("flux", 1, None),  # double block
    ("flux", 2, None),  # single block
])
def test_layer_equals_stock_attention_on_both_texts(family, layer, cfg, request, monkeypatch):
    from dit_attn.hooks import nag_tokens

    monkeypatch.setattr(nag_tokens, "TOKEN_FAMILIES", ())  # the row path (the token path equals it: tests below)
    if family == "chroma":
        from dit_attn.toy.chroma import build_chroma_pipeline

        pipe = build_chroma_pipeline(num_layers=2, num_single_layers=2, num_heads=4, head_dim=8)
        pipe.set_progress_bar_config(disable=True)
        call = functools.partial(flux_call, guidance_scale=1.0)
    else:
        pipe = request.getfixturevalue(f"{family}_pipe")
        call = flux_call if family == "flux" else sd3_call
    kwargs = {"guidance_scale": cfg} if cfg is not None else {}
    flux_like = family != "sd3"
    attn = flux_attention_module(pipe, layer) if flux_like else pipe.transformer.transformer_blocks[layer].attn
    single = flux_like and layer >= len(pipe.transformer.transformer_blocks)
    hook, records = record_module(attn)
    try:
        with da.apply(pipe, da.NAG(NEGATIVE, layers=[layer], **SETTINGS)):
            call(pipe, PROMPT, num_images_per_prompt=2, **kwargs)
    finally:
        hook.remove()
    n = 2
    stock_rows = 2 * n if family == "sd3" and cfg > 1 else n
    cond = list(range(stock_rows - n, stock_rows))
    assert len(records) == 3 and all(r[0]["hidden_states"].shape[0] == stock_rows + n for r in records)
    ratios = []
    for module_kwargs, out in records:
        h = module_kwargs["hidden_states"]
        image = slice(0, h.shape[1]) if family == "sd3" else slice(8, None)
        ratios.append(check_layer(attn, module_kwargs, out, stock_rows, cond, 8, image, single))
    ratios = torch.cat(ratios)
    print(f"{family} layer {layer}: ratio {ratios.min():.3f}..{ratios.max():.3f}")
    assert bool((ratios > SETTINGS["tau"]).any())  # the clipping is exercised


class NAGSDPA(TorchFunctionMode):
    """Explicit NAG on a stock transformer called with [positive rows ; negative rows]: every joint SDPA
    call gives the negative rows the positive rows' image q/k/v and combines the positive rows' image outputs."""

    def __init__(self, n, text_len, text_first, layers=None, scale=4.0, tau=1.2, alpha=0.5):
        super().__init__()
        self.n, self.text_len, self.text_first, self.layers = n, text_len, text_first, layers
        self.settings = dict(scale=scale, tau=tau, alpha=alpha)
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        named = dict(zip(("query", "key", "value"), args)) | kwargs
        q, k, v = named.pop("query"), named.pop("key"), named.pop("value")
        layer, self.count = self.count, self.count + 1
        seq = q.shape[2]
        if self.layers is not None and layer not in self.layers:
            return func(q, k, v, **named)
        image = slice(self.text_len, seq) if self.text_first else slice(0, seq - self.text_len)
        n = self.n
        q, k, v = q.clone(), k.clone(), v.clone()
        for x in (q, k, v):
            x[n:, :, image] = x[:n, :, image]
        out = func(q, k, v, **named)
        merged = out[:, :, image].transpose(1, 2).flatten(2)  # (B, S_img, H·D)
        mixed, _ = nag_formula(merged[:n], merged[n:], **self.settings)
        out = out.clone()
        out[:n, :, image] = mixed.unflatten(-1, (q.shape[1], -1)).transpose(1, 2)
        return out


def doubled(call, embeds, pooled):
    """The recorded call with one negative row per row appended."""
    out = dict(call)
    n = call["hidden_states"].shape[0]
    for key in ("hidden_states", "timestep", "guidance"):
        value = call.get(key)
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            out[key] = torch.cat([value, value])
    out["encoder_hidden_states"] = torch.cat([call["encoder_hidden_states"], embeds.expand(n, -1, -1)])
    out["pooled_projections"] = torch.cat([call["pooled_projections"], pooled.expand(n, -1)])
    return out


def layer_count(pipe):
    t = pipe.transformer
    return len(t.transformer_blocks) + len(getattr(t, "single_transformer_blocks", ()))


@pytest.mark.parametrize("family,layers", [("sd3", None), ("sd3", (0, 1)), ("flux", None)])
def test_guided_run_equals_explicit_nag_sdpa(family, layers, request):
    pipe = request.getfixturevalue(f"{family}_pipe")
    call = flux_call if family == "flux" else sd3_call
    kwargs = {} if family == "flux" else {"guidance_scale": 1.0}
    with CallRecorder(pipe) as rec, da.apply(pipe, da.NAG(NEGATIVE, layers=layers, **SETTINGS)):
        call(pipe, ["a red circle", "a green square"], **kwargs)
    embeds, pooled = encode(pipe, NEGATIVE)
    assert len(rec.calls) == len(rec.steps) == 3
    for recorded, got in zip(rec.calls, rec.steps):
        n = recorded["hidden_states"].shape[0]
        mode = NAGSDPA(n, recorded["encoder_hidden_states"].shape[1], family == "flux", layers, **SETTINGS)
        with mode:
            want = replay(pipe.transformer, doubled(recorded, embeds, pooled))[:n]
        assert mode.count == layer_count(pipe)
        stock = replay(pipe.transformer, recorded)
        assert (got - want).abs().max() <= ROUNDING
        assert (got - stock).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_scale_one_and_alpha_zero_are_stock(family, request):
    pipe = request.getfixturevalue(f"{family}_pipe")
    call = flux_call if family == "flux" else sd3_call
    stock = call(pipe, PROMPT)
    for edit in (da.NAG(NEGATIVE, scale=1), da.NAG(NEGATIVE, alpha=0)):
        with da.apply(pipe, edit):
            assert torch.equal(call(pipe, PROMPT), stock)
    with da.apply(pipe, da.NAG(NEGATIVE)):
        assert (call(pipe, PROMPT) - stock).abs().max() > 1e-3


@pytest.mark.parametrize("family,kwargs", [
    ("sd3", {"guidance_scale": 4.0}), ("sd3", {"guidance_scale": 1.0}),
    ("flux", {}), ("flux", {"negative_prompt": "blurry", "true_cfg_scale": 2.0}),
])
def test_call_count_equals_stock(family, kwargs, request):
    pipe = request.getfixturevalue(f"{family}_pipe")
    call = flux_call if family == "flux" else sd3_call
    with CallRecorder(pipe) as stock:
        call(pipe, PROMPT, **kwargs)
    counted = []
    hook = pipe.transformer.transformer_blocks[0].register_forward_pre_hook(lambda m, a: counted.append(1))
    try:
        with CallRecorder(pipe) as rec, da.apply(pipe, da.NAG(NEGATIVE)):
            call(pipe, PROMPT, **kwargs)
    finally:
        hook.remove()
    assert len(rec.calls) == len(counted) == len(stock.calls)
    assert [c["hidden_states"].shape for c in rec.calls] == [c["hidden_states"].shape for c in stock.calls]


def test_start_end_window(sd3_pipe):
    """3 steps, end=0.5: steps 0 and 1 guided, step 2 stock (its ε equals a stock replay)."""
    with CallRecorder(sd3_pipe) as rec, da.apply(sd3_pipe, da.NAG(NEGATIVE, end=0.5, **SETTINGS)):
        sd3_call(sd3_pipe, PROMPT, guidance_scale=1.0)
    for i, (recorded, got) in enumerate(zip(rec.calls, rec.steps)):
        stock = replay(sd3_pipe.transformer, recorded)
        moved = (got - stock).abs().max()
        assert (moved > 1e-3) if i < 2 else (moved == 0)


def test_with_head_guidance_equals_explicit(sd3_pipe):
    """HeadGuidance + NAG, CFG off: ε = ε_c + s·(ε_c − ε_p), both from the explicit NAG (ε_p with the
    perturbed head, which perturbs the negative rows too)."""
    s = 2.0
    with CallRecorder(sd3_pipe) as rec, da.apply(sd3_pipe, da.NAG(NEGATIVE, **SETTINGS),
                                                 da.HeadGuidance(heads=["L1H2"], scale=s)):
        sd3_call(sd3_pipe, PROMPT, guidance_scale=1.0, num_images_per_prompt=2)
    embeds, pooled = encode(sd3_pipe, NEGATIVE)
    attn = sd3_pipe.transformer.transformer_blocks[1].attn
    for recorded, got in zip(rec.calls, rec.steps):
        n, text_len = recorded["hidden_states"].shape[0], recorded["encoder_hidden_states"].shape[1]
        call = doubled(recorded, embeds, pooled)
        with NAGSDPA(n, text_len, False, **SETTINGS):
            cond = replay(sd3_pipe.transformer, call)[:n]
        with PerturbSDPA(attn, [2]), NAGSDPA(n, text_len, False, **SETTINGS):
            perturbed = replay(sd3_pipe.transformer, call)[:n]
        assert (got - (cond + s * (cond - perturbed))).abs().max() <= 3 * ROUNDING
        assert (cond - perturbed).abs().max() > 1e-3


def test_settings_round_trip_and_errors(sd3_pipe):
    edit = da.NAG(NEGATIVE, scale=3, tau=2.0, alpha=0.3, layers=[2, 0], start=0.1, end=0.9, norm="l2")
    assert edit.layers == (0, 2)
    assert da.edit_from_dict(edit.to_dict()) == edit
    bad = [dict(negative_prompt=" "), dict(negative_prompt=None), dict(scale=0.5), dict(scale=float("nan")),
           dict(tau=0), dict(tau=-1), dict(alpha=1.5), dict(alpha=-0.1), dict(layers=[]), dict(layers=[-1]),
           dict(start=0.5, end=0.5), dict(end=1.5), dict(norm="l3"), dict(scale=True)]
    for kwargs in bad:
        with pytest.raises(ValueError) as info:
            da.NAG(**({"negative_prompt": NEGATIVE} | kwargs))
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="this model has layers 0-2"):
        da.apply(sd3_pipe, da.NAG(NEGATIVE, layers=[3]))
    with pytest.raises(ValueError, match="not with a TextPatch or TextGuard"):
        da.apply(sd3_pipe, da.NAG(NEGATIVE), da.TextPatch(layers=[1], source_prompt=NEGATIVE))
    with pytest.raises(TypeError, match="needs a pipeline"):
        da.apply(sd3_pipe.transformer, da.NAG(NEGATIVE))


def test_cli_generate_with_nag(tmp_path, capsys):
    import json

    from PIL import Image

    from dit_attn.cli import main

    def run(name, *extra):
        assert main(["generate", "a circle", "--steps", "2", "--size", "32", "--guidance-scale", "1",
                     "--out", str(tmp_path / name), *extra]) == 0
        return Image.open(next((tmp_path / name).glob("*.png")))

    plain = run("plain")
    guided = run("nag", "--nag-negative", "red", "--nag-scale", "3", "--nag-alpha", "0.5")
    assert json.loads(guided.text["dit-attn"])["edits"] == [da.NAG("red", scale=3.0, alpha=0.5).to_dict()]
    line = json.loads((tmp_path / "nag" / "manifest.jsonl").read_text().splitlines()[0])
    assert da.edit_from_dict(line["edits"][0]) == da.NAG("red", scale=3.0, alpha=0.5)
    assert guided.tobytes() != plain.tobytes()
    capsys.readouterr()
    assert main(["generate", "x", "--nag-scale", "3", "--out", str(tmp_path / "bad")]) == 2
    assert "--nag-negative" in capsys.readouterr().err
    assert main(["generate", "x", "--nag-negative", "red", "--nag-alpha", "2", "--out", str(tmp_path / "bad")]) == 2
    assert "alpha must be in [0, 1]" in capsys.readouterr().err


def test_batch_file_with_a_negative_prompt_per_line(tmp_path):
    import json

    from PIL import Image

    from dit_attn.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(line) for line in [
        {"prompt": "a circle", "seed": 4, "nag_negative": "red"},
        {"prompt": "a circle", "seed": 4, "nag_negative": "small", "nag_scale": 3},
        {"prompt": "a circle", "seed": 4},
    ]) + "\n")
    out = tmp_path / "out"
    assert main(["generate", "--prompts", str(prompts), "--steps", "2", "--size", "32", "--guidance-scale", "1",
                 "--out", str(out)]) == 0
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [line["edits"] for line in lines] == [[da.NAG("red").to_dict()], [da.NAG("small", scale=3.0).to_dict()], []]
    images = [Image.open(out / line["file"]).tobytes() for line in lines]
    assert len(set(images)) == 3  # same prompt and seed: each negative prompt changes the image


def test_batch_calls_take_a_negative_prompt_per_line(tmp_path, monkeypatch):
    """Lines that differ only in prompt, seed and negative prompt share one pipeline call (NAG with a negative
    prompt per prompt) and give the images each line gives in a call of its own."""
    import json

    import numpy as np
    from PIL import Image

    from dit_attn import loading
    from dit_attn.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(line) for line in [
        {"prompt": "a circle", "seed": 4, "nag_negative": "red"},
        {"prompt": "a circle", "seed": 4, "nag_negative": "small"},
        {"prompt": "a square", "nag_negative": "red"},
        {"prompt": "a circle", "seed": 4, "nag_negative": "left", "nag_scale": 3},
    ]) + "\n")
    calls, stock = [], loading.call_pipeline
    monkeypatch.setattr(loading, "call_pipeline", lambda pipe, **kw: calls.append(len(kw["prompt"])) or stock(pipe, **kw))
    images = {}
    for size in (1, 3):
        out = tmp_path / f"b{size}"
        assert main(["generate", "--prompts", str(prompts), "--steps", "2", "--size", "32", "--guidance-scale", "1",
                     "--batch-size", str(size), "--out", str(out)]) == 0
        lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
        assert [line["edits"][0]["negative_prompt"] for line in lines] == ["red", "small", "red", "left"]
        images[size] = [np.asarray(Image.open(out / line["file"]), dtype=float) for line in lines]
    assert calls == [1, 1, 1, 1, 3, 1]
    for single, batched in zip(images[1], images[3]):
        assert np.abs(single - batched).max() <= 2  # batching changes float rounding only
    assert np.abs(images[3][0] - images[3][1]).max() > 8  # the two negatives of one call stay apart


def _block_inputs(pipe, run):
    """(rows, text tokens) of every call's first block, and the final latents, of `run()`."""
    seen = []
    block = pipe.transformer.transformer_blocks[0]
    hook = block.register_forward_pre_hook(
        lambda m, a, k: seen.append((k["hidden_states"].shape[0], k["encoder_hidden_states"].shape[1])), with_kwargs=True)
    try:
        return run(), seen
    finally:
        hook.remove()


@pytest.mark.parametrize("model,layers,cfg,others", [
    ("sd3", None, 1.0, ()), ("sd3", (0, 1), 4.0, ()), ("sd35", None, 4.0, ()),  # SD3.5: dual attention, qk norm
    # with HeadGuidance its perturbed copies carry the negative tokens too; LocalAttention windows both calls
    # (radius 1 on the 2×2 grid: each image query keeps only its own image key)
    ("sd3", None, 1.0, (da.HeadGuidance(heads=["L1H2"], scale=2.0), da.LocalAttention(radius=1, layers=[0, 2]))),
])
def test_token_path_equals_row_path(model, layers, cfg, others, request, monkeypatch):
    """NAG with the negative text as extra tokens of each row (SD3's default for layers 0…k) gives the
    row path's steps; its calls keep the stock rows and carry twice the text."""
    from dit_attn.hooks import nag_tokens

    pipe = request.getfixturevalue(f"{model}_pipe")
    edits = [da.NAG(NEGATIVE, layers=layers, **SETTINGS), *others]

    def run():
        with CallRecorder(pipe) as rec, da.apply(pipe, *edits):
            sd3_call(pipe, ["a red circle", "a green square"], guidance_scale=cfg)
        return rec.steps

    tokens, token_calls = _block_inputs(pipe, run)
    monkeypatch.setattr(nag_tokens, "TOKEN_FAMILIES", ())
    rows, row_calls = _block_inputs(pipe, run)
    stock_rows = 4 if cfg > 1 else 2
    text_len = row_calls[0][1]
    assert all(c == (stock_rows, 2 * text_len) for c in token_calls)
    assert all(c == (stock_rows + 2, text_len) for c in row_calls)
    for got, want in zip(tokens, rows, strict=True):
        assert (got - want).abs().max() <= 1e-5


@pytest.fixture(scope="module")
def chroma_pipe():
    from dit_attn.toy.chroma import build_chroma_pipeline

    pipe = build_chroma_pipeline(num_layers=2, num_single_layers=2, num_heads=4, head_dim=8)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# FLUX.1 / Chroma toys: 2 double blocks (layers 0, 1), 2 single blocks (layers 2, 3). Layers (0,): the negative
# tokens leave after the first double block; (0, 1, 2): after the first single block (Chroma's single blocks carry
# them in their one stream, untouched, to the end).
@pytest.mark.parametrize("model,layers,kwargs,others", [
    ("flux", None, {}, ()),
    ("flux", (0,), {}, ()),
    ("flux", (0, 1, 2), {}, ()),
    ("flux", None, {"negative_prompt": "blurry", "true_cfg_scale": 2.0}, ()),  # true CFG: a second, stock call
    # HeadGuidance forks its perturbed copies at a single block; LocalAttention (radius 1 on the 4×4 grid) windows
    # both attention calls of a NAG layer
    ("flux", None, {}, (da.HeadGuidance(heads=["L2H1"], scale=2.0), da.LocalAttention(radius=1, layers=[0, 3]))),
    ("chroma", None, {"guidance_scale": 1.0}, ()),
    ("chroma", (0,), {"guidance_scale": 1.0}, ()),
    ("chroma", (0, 1, 2), {"guidance_scale": 1.0}, ()),
    ("chroma", None, {"guidance_scale": 3.0, "negative_prompt": "blurry"}, ()),  # CFG on: a second, stock call
    ("chroma", (0, 1, 2), {"guidance_scale": 1.0}, (da.HeadGuidance(heads=["L1H1"], scale=2.0),)),
])
def test_flux_layout_token_path_equals_row_path(model, layers, kwargs, others, request, monkeypatch):
    """FLUX.1 and Chroma: NAG with the negative text as extra tokens of each row gives the row path's steps
    (whose layers match the stock modules on both texts, test_layer_equals_stock_attention_on_both_texts); the
    guided calls keep the stock rows and carry twice the text, the others are stock."""
    from dit_attn.hooks import nag_tokens

    pipe = request.getfixturevalue(f"{model}_pipe")
    # Chroma masks each prompt's padding: prompts of three lengths, so each text segment's own mask matters
    prompts, negative = (["a red circle", "a cat"], "blue") if model == "chroma" else (["a red circle", "a green square"], NEGATIVE)
    edits = [da.NAG(negative, layers=layers, **SETTINGS), *others]

    def run():
        with CallRecorder(pipe) as rec, da.apply(pipe, *edits):
            flux_call(pipe, prompts, **kwargs)
        return rec.steps

    tokens, token_calls = _block_inputs(pipe, run)
    stock, stock_calls = _block_inputs(pipe, lambda: flux_call(pipe, prompts, **kwargs))
    monkeypatch.setattr(nag_tokens, "TOKEN_FAMILIES", ())
    rows, row_calls = _block_inputs(pipe, run)
    text_len = stock_calls[0][1]
    cfg = len(stock_calls) == 6  # a conditional and an unconditional call per step
    guided = slice(0, None, 2) if cfg else slice(None)
    assert len(token_calls) == len(row_calls) == len(stock_calls)
    assert all(c == (2, 2 * text_len) for c in token_calls[guided])
    assert all(c == (4, text_len) for c in row_calls[guided])
    if cfg:
        assert token_calls[1::2] == row_calls[1::2] == stock_calls[1::2]
    for got, want in zip(tokens, rows, strict=True):
        assert (got - want).abs().max() <= 1e-5
    assert max((got - s).abs().max() for got, s in zip(tokens, stock)) > 1e-3


def test_chroma_scale_one_and_alpha_zero_are_stock(chroma_pipe):
    for cfg in (1.0, 3.0):
        stock = flux_call(chroma_pipe, PROMPT, guidance_scale=cfg)
        for edit in (da.NAG(NEGATIVE, scale=1), da.NAG(NEGATIVE, alpha=0)):
            with da.apply(chroma_pipe, edit):
                assert torch.equal(flux_call(chroma_pipe, PROMPT, guidance_scale=cfg), stock)


def test_flux_token_path_with_an_image_prompt_equals_row_path(monkeypatch):
    """FLUX.1 with an IP-Adapter: the token path's double blocks add the image-prompt output as the row path does."""
    from dit_attn.hooks import nag_tokens

    from .test_ip_adapter import FAMILIES, IMAGE_EMBED_DIM

    build, state_dict_of, _, _ = FAMILIES["flux"]
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer._load_ip_adapter_weights(state_dict_of(pipe.transformer), low_cpu_mem_usage=False)
    image_prompt = dict(ip_adapter_image_embeds=[torch.randn(1, 1, IMAGE_EMBED_DIM, generator=torch.Generator().manual_seed(5))],
                        negative_ip_adapter_image_embeds=[torch.zeros(1, 1, IMAGE_EMBED_DIM)])

    def run():
        with CallRecorder(pipe) as rec, da.apply(pipe, da.NAG(NEGATIVE, **SETTINGS)):
            flux_call(pipe, ["a red circle", "a green square"], **image_prompt)
        return rec.steps

    tokens, token_calls = _block_inputs(pipe, run)
    monkeypatch.setattr(nag_tokens, "TOKEN_FAMILIES", ())
    rows, row_calls = _block_inputs(pipe, run)
    assert token_calls[0][0] == 2 and row_calls[0][0] == 4
    for got, want in zip(tokens, rows, strict=True):
        assert (got - want).abs().max() <= 1e-5
    image_prompt["ip_adapter_image_embeds"] = [torch.zeros(1, 1, IMAGE_EMBED_DIM)]  # the image prompt acts
    monkeypatch.undo()
    assert max((got - other).abs().max() for got, other in zip(tokens, run())) > 1e-3


def test_kontext_token_path_equals_row_path(flux_pipe, monkeypatch):
    """FLUX.1 Kontext: the reference image's tokens after the generated ones, guided with them as on the row path."""
    from dit_attn.hooks import nag_tokens

    from .test_family_kontext import kontext_call

    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline(**{k: v for k, v in flux_pipe.components.items() if k in (
        "transformer", "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")})
    pipe.set_progress_bar_config(disable=True)

    def run():
        with CallRecorder(pipe) as rec, da.apply(pipe, da.NAG(NEGATIVE, **SETTINGS)):
            kontext_call(pipe)
        return rec.steps

    tokens, token_calls = _block_inputs(pipe, run)
    monkeypatch.setattr(nag_tokens, "TOKEN_FAMILIES", ())
    rows, row_calls = _block_inputs(pipe, run)
    assert token_calls[0] == (1, 16) and row_calls[0] == (2, 8)
    for got, want in zip(tokens, rows, strict=True):
        assert (got - want).abs().max() <= 1e-5


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_shared_image_keys_equal_two_attention_calls(family, request, monkeypatch):
    """SD3 and FLUX.1 on the CPU: the image keys' part of Z⁺ and Z⁻ computed once and merged by log-sum-exp, and two
    attention calls per NAG layer, each give the row path's steps (and the merge runs: SDPA is called less); CFG's
    unconditional rows ride in SD3's call (its CFG is one batched call)."""
    pipe = request.getfixturevalue(f"{family}_pipe")
    call, layers = (flux_call, 4) if family == "flux" else (sd3_call, 3)
    # two SDPA calls at each NAG layer, 3 steps
    check_shared_image_keys(pipe, lambda: call(pipe, ["a red circle", "a green square"]), da.NAG(NEGATIVE, **SETTINGS),
                            2 * layers * 3, monkeypatch)


def test_alpha_defaults_to_the_official_code_per_family(sd3_pipe, flux_pipe):
    """alpha left None is the official code's for the model at apply: 0.125 on SD3 (its NAG pipeline's), 0.25 on
    FLUX.1; the run equals the one with that alpha given. The settings keep None (the family's default)."""
    nag = da.NAG(NEGATIVE)
    assert nag.alpha is None and nag.end is None and nag.to_dict()["alpha"] is None
    assert da.NAG.from_dict(nag.to_dict()) == nag
    for pipe, call, alpha in ((sd3_pipe, sd3_call, 0.125), (flux_pipe, flux_call, 0.25)):
        with da.apply(pipe, nag) as handle:
            default = call(pipe)
        assert (handle.edits[0].alpha, handle.edits[0].end) == (alpha, 1.0)
        with da.apply(pipe, da.NAG(NEGATIVE, alpha=alpha)):
            assert torch.equal(call(pipe), default)

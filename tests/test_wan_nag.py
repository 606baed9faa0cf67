"""NAG on Wan: in each cross-attention attn2 the guided rows' text attention output Z⁺ is combined with Z⁻, the
same video queries on the negative text states — checked against the stock attn2 module run on the positive text
and on the negative text states a stock run of the negative prompt gives attn2 (the formula of tests/test_nag.py);
no negative rows; with HeadGuidance the perturbed copies are guided too; stock at scale 1; the stock call count."""
import pytest
import torch

import dit_attn as da
from dit_attn.toy.wan import WAN_RUN, build_wan_pipeline

from .conftest import CallRecorder
from .test_nag import ROUNDING, SETTINGS, _clone, nag_formula

torch.set_num_threads(1)
PROMPTS, NEGATIVE = ["a red circle", "a green cat"], "a blue square"


@pytest.fixture(scope="module")
def wan():
    pipe = build_wan_pipeline(num_layers=3, num_heads=4, head_dim=12)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan_call(pipe, prompt=PROMPTS, guidance_scale=1.0, **kwargs):
    return pipe(prompt=prompt, num_inference_steps=2, guidance_scale=guidance_scale, output_type="latent",
                generator=torch.Generator().manual_seed(0), **WAN_RUN, **kwargs).frames


def stock_text_attention(attn, hidden_states, text):
    """(output, merged-heads attention output before `to_out`) of the stock attn2 module."""
    captured = {}
    handle = attn.to_out[0].register_forward_pre_hook(lambda m, a: captured.__setitem__("z", a[0].clone()))
    try:
        with torch.no_grad():
            out = attn(hidden_states, text)
    finally:
        handle.remove()
    return out, captured["z"]


def record_cross_attention(pipe, run):
    """Every attn2 call of run(): per block, [(inputs by name, output)]."""
    modules = [block.attn2 for block in pipe.transformer.blocks]
    records = {i: [] for i in range(len(modules))}

    def hook(i):
        def record(m, args, kwargs, out):
            named = dict(zip(("hidden_states", "encoder_hidden_states"), args)) | kwargs
            records[i].append(({k: _clone(v) for k, v in named.items()}, out.clone()))
        return record

    handles = [m.register_forward_hook(hook(i), with_kwargs=True) for i, m in enumerate(modules)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return modules, records


@pytest.mark.parametrize("with_guidance", [False, True])
def test_cross_attention_outputs_equal_the_formula(wan, with_guidance):
    _, negative_run = record_cross_attention(wan, lambda: wan_call(wan, prompt=NEGATIVE))
    negative_text = negative_run[0][0][0]["encoder_hidden_states"]  # what attn2 sees of the negative prompt
    edits = [da.NAG(NEGATIVE, **SETTINGS)] + ([da.HeadGuidance(heads=["L1H1"], scale=2.0)] if with_guidance else [])

    def guided():
        with da.apply(wan, *edits):
            wan_call(wan)

    modules, records = record_cross_attention(wan, guided)
    rows = len(PROMPTS) * (2 if with_guidance else 1)  # HeadGuidance's copies are NAG-guided too
    clipped = 0
    for i, attn in enumerate(modules):
        assert len(records[i]) == 2  # one call per step
        for inputs, out in records[i]:
            hidden, text = inputs["hidden_states"], inputs["encoder_hidden_states"]
            assert hidden.shape[0] == rows  # no negative rows
            _, z_pos = stock_text_attention(attn, hidden, text)
            _, z_neg = stock_text_attention(attn, hidden, negative_text.expand(rows, -1, -1))
            combined, ratio = nag_formula(z_pos, z_neg, SETTINGS["scale"], SETTINGS["tau"], SETTINGS["alpha"])
            clipped += int((ratio > SETTINGS["tau"]).sum())
            with torch.no_grad():
                want = attn.to_out[1](attn.to_out[0](combined))
            assert (out - want).abs().max() < ROUNDING
    assert clipped > 0  # tau clips some tokens, so the norm rule is exercised


def test_scale_one_is_stock_and_calls_equal_stock(wan):
    stock = wan_call(wan)
    with da.apply(wan, da.NAG(NEGATIVE, scale=1.0)):
        assert torch.equal(wan_call(wan), stock)
    with CallRecorder(wan) as plain:
        wan_call(wan, guidance_scale=3.0)
    with CallRecorder(wan) as guided, da.apply(wan, da.NAG(NEGATIVE, **SETTINGS)):
        out = wan_call(wan, guidance_scale=3.0)
    assert len(guided.calls) == len(plain.calls) == 4
    assert (out - wan_call(wan, guidance_scale=3.0)).abs().max() > 1e-4
    assert type(wan.transformer.blocks[0].attn2.processor).__name__ == "WanAttnProcessor"  # removed again

"""The tiny model's bare call: its 256 zero "T5" tokens collapse to one with a log(256) key bias,
which gives the stock 256-token result (the hook removed) up to rounding."""
import numpy as np
import pytest
import torch

import dit_attn as da
from dit_attn.hooks.zero_tokens import collapse_zero_tokens

PROMPT = "a red circle on a white background"


@pytest.fixture(scope="module")
def tiny():
    pipe = da.load_pipeline("tiny")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, **kwargs):
    generator = torch.Generator().manual_seed(3)
    return pipe([PROMPT, "a sign that says \"A\" in blue on a black background"], generator=generator,
                num_inference_steps=4, output_type="np", **kwargs).images


def without_hook(pipe):
    pipe.transformer._dit_attn_zero_tokens.remove()


def test_collapsed_call_equals_the_stock_256_tokens():
    pipe = da.load_pipeline("tiny", dtype=torch.float64)  # float64: equal up to 1e-12, float32 rounding apart
    pipe.set_progress_bar_config(disable=True)
    seen = []
    pipe.transformer.transformer_blocks[0].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"].shape[1]), with_kwargs=True)
    fast = generate(pipe)
    without_hook(pipe)
    stock = generate(pipe)
    clip = pipe.tokenizer_max_length
    assert seen[0] == clip + 1 and seen[-1] == clip + 256  # the collapsed call ran one zero token
    assert np.abs(fast - stock).max() < 1e-10
    assert np.abs(fast - generate(pipe, max_sequence_length=1)).max() > 1e-3  # the bias matters: 1 token is not 256


def test_float32_collapse_is_within_rounding(tiny):
    fast = generate(tiny)
    try:
        without_hook(tiny)
        stock = generate(tiny)
    finally:
        collapse_zero_tokens(tiny)
    assert np.abs(fast - stock).max() < 2e-4


def test_collapse_steps_aside_for_edits_and_t5(tiny):
    try:
        without_hook(tiny)
        stock = generate(tiny)
    finally:
        collapse_zero_tokens(tiny)
    seen = []
    hook = tiny.transformer.transformer_blocks[0].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"].shape[1]), with_kwargs=True)
    try:
        with da.apply(tiny, da.SoftPAG(heads=["L1"], u=0.0)):  # dit-attn's processors see the full call
            edited = generate(tiny)
    finally:
        hook.remove()
    assert set(seen) == {tiny.tokenizer_max_length + 256}
    assert np.array_equal(edited, stock)
    with pytest.raises(ValueError, match="T5 encoder"):
        collapse_zero_tokens(type("Pipe", (), {"text_encoder_3": object()})())


def test_a_deep_copy_runs_its_own_weights_and_still_collapses(tiny):
    import copy

    copied = copy.deepcopy(tiny.transformer)
    config = copied.config
    call = dict(hidden_states=torch.randn(1, config.in_channels, 16, 16),
                encoder_hidden_states=torch.cat([torch.randn(1, tiny.tokenizer_max_length, config.joint_attention_dim),
                                                 torch.zeros(1, 256, config.joint_attention_dim)], dim=1),
                pooled_projections=torch.randn(1, config.pooled_projection_dim), timestep=torch.tensor([500.0]))
    seen = []
    copied.transformer_blocks[0].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"].shape[1]), with_kwargs=True)
    with torch.no_grad():
        same = copied(**call).sample
        assert torch.equal(same, tiny.transformer(**call).sample)
        copied.proj_out.weight.mul_(2)
        assert not torch.allclose(copied(**call).sample, tiny.transformer(**call).sample)
    assert seen == [tiny.tokenizer_max_length + 1] * 2

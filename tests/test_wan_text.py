"""Wan 2.1: TextPatch and TextGuard through the cross-attention `attn2` (layer i = block i's attn2).

The cross-attention processor reproduces diffusers exactly (text-to-video and image-to-video, fused
projections too); TextPatch against independent references: a stock run of the source prompt (text
enters only through attn2, so patching every layer is that run) and a forward pre-hook that hands one
attn2 the source prompt's projected text states."""
import pytest
import torch
from PIL import Image

import dit_attn as da
from dit_attn import processors
from dit_attn.processors.state import EditState
from dit_attn.toy.wan import WAN_I2V_RUN, WAN_RUN, build_wan_i2v_pipeline, build_wan_pipeline

from .conftest import CallRecorder, replay

torch.set_num_threads(1)
PROMPT, SOURCE = "a red circle", "a blue square cat"
LAYERS = 3


@pytest.fixture(scope="module")
def wan_pipe():
    pipe = build_wan_pipeline(num_layers=LAYERS, num_heads=4, head_dim=12)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def i2v_pipe():
    pipe = build_wan_i2v_pipeline(num_layers=2, num_heads=2, head_dim=12)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan_call(pipe, prompt=PROMPT, steps=2, seed=0, **kwargs):
    args = dict(num_inference_steps=steps, output_type="latent", guidance_scale=3.0, **WAN_RUN)
    args.update(kwargs)
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **args).frames


def i2v_call(pipe, prompt=PROMPT, **kwargs):
    args = dict(image=Image.new("RGB", (32, 32), (200, 30, 30)), num_inference_steps=2, guidance_scale=3.0,
                output_type="latent", **WAN_I2V_RUN)
    args.update(kwargs)
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), **args).frames


def replayed_with_cross_processors(transformer, calls, layers):
    """Each recorded call replayed with dit-attn's processors on attn1 and attn2 (nothing to patch)."""
    originals = processors.install(transformer, EditState(patch_layers=frozenset(range(layers))))
    try:
        assert type(transformer.blocks[0].attn2.processor).__name__ == "WanCrossAttnProcessor"
        return [replay(transformer, c) for c in calls]
    finally:
        processors.restore(transformer, originals)


@pytest.mark.parametrize("fused", [False, True])
def test_cross_attention_processor_bit_exact_text_to_video(wan_pipe, fused):
    with CallRecorder(wan_pipe) as rec:
        wan_call(wan_pipe, prompt=[PROMPT, SOURCE], negative_prompt=["blurry", "dark"])
    transformer = wan_pipe.transformer
    if fused:
        transformer.fuse_qkv_projections()
    try:
        stock = [replay(transformer, c) for c in rec.calls]
        mine = replayed_with_cross_processors(transformer, rec.calls, LAYERS)
    finally:
        transformer.unfuse_qkv_projections()
    assert max((a - b).abs().max().item() for a, b in zip(stock, mine)) == 0.0


def test_cross_attention_processor_bit_exact_image_to_video(i2v_pipe):
    with CallRecorder(i2v_pipe) as rec:
        i2v_call(i2v_pipe, prompt=[PROMPT, SOURCE])
    assert rec.calls[0]["encoder_hidden_states_image"] is not None
    stock = [replay(i2v_pipe.transformer, c) for c in rec.calls]
    mine = replayed_with_cross_processors(i2v_pipe.transformer, rec.calls, 2)
    assert max((a - b).abs().max().item() for a, b in zip(stock, mine)) == 0.0


def test_attn2_is_stock_without_text_edits_and_restored_after(wan_pipe):
    before = dict(wan_pipe.transformer.attn_processors)
    with da.apply(wan_pipe, da.HeadGuidance(heads=["L1H1"])):
        assert wan_pipe.transformer.blocks[1].attn2.processor is before["blocks.1.attn2.processor"]
    with da.apply(wan_pipe, da.TextPatch(layers=[1], source_prompt=SOURCE)):
        assert type(wan_pipe.transformer.blocks[1].attn2.processor).__name__ == "WanCrossAttnProcessor"
        assert type(wan_pipe.transformer.blocks[1].attn1.processor).__name__ == "WanSelfAttnProcessor"
    assert all(wan_pipe.transformer.attn_processors[k] is v for k, v in before.items())


def test_text_patch_with_own_prompt_changes_nothing(wan_pipe):
    stock = wan_call(wan_pipe)
    with da.apply(wan_pipe, da.TextPatch(layers=list(range(LAYERS)), source_prompt=PROMPT)):
        same = wan_call(wan_pipe)
    assert (same - stock).abs().max() < 1e-5


def test_text_patch_on_every_layer_is_the_source_run(wan_pipe):
    source_run = wan_call(wan_pipe, prompt=SOURCE)
    stock = wan_call(wan_pipe)
    with CallRecorder(wan_pipe) as stock_calls:
        wan_call(wan_pipe)
    with CallRecorder(wan_pipe) as rec, da.apply(wan_pipe, da.TextPatch(layers=list(range(LAYERS)), source_prompt=SOURCE)):
        got = wan_call(wan_pipe)
    assert len(rec.calls) == len(stock_calls.calls) == 4  # 2 steps × (cond, uncond): widened, not extra calls
    assert (got - stock).abs().max() > 1e-2
    assert (got - source_run).abs().max() < 1e-5


def test_text_patch_on_every_layer_is_the_source_run_image_to_video(i2v_pipe):
    source_run = i2v_call(i2v_pipe, prompt=SOURCE)
    with da.apply(i2v_pipe, da.TextPatch(layers=[0, 1], source_prompt=SOURCE)):
        got = i2v_call(i2v_pipe)
    assert (got - i2v_call(i2v_pipe)).abs().max() > 1e-3
    assert (got - source_run).abs().max() < 1e-5


class SourceTextInto:
    """Reference patch of one layer on the stock model: in the conditional calls (the first of each step),
    block `layer`'s attn2 gets the source prompt's text states after the condition embedder."""

    def __init__(self, pipe, layer: int, source: str):
        transformer = pipe.transformer
        embeds, _ = pipe.encode_prompt(source, do_classifier_free_guidance=False,
                                       max_sequence_length=WAN_RUN["max_sequence_length"])
        with torch.no_grad():
            self.context = transformer.condition_embedder.text_embedder(embeds)
        self.calls = 0
        self.handles = [transformer.register_forward_pre_hook(self._count),
                        transformer.blocks[layer].attn2.register_forward_pre_hook(self._swap)]

    def _count(self, module, args):
        self.calls += 1

    def _swap(self, module, args):
        if self.calls % 2 == 1:  # WanPipeline: the "cond" call, then the "uncond" one
            hidden, context, *rest = args
            assert context.shape == self.context.shape
            return (hidden, self.context, *rest)
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("layer", [0, 2])
def test_text_patch_one_layer_equals_swapping_its_cross_attention_text(wan_pipe, layer):
    stock = wan_call(wan_pipe)
    with SourceTextInto(wan_pipe, layer, SOURCE) as reference:
        want = wan_call(wan_pipe)
    assert reference.calls == 4
    with da.apply(wan_pipe, da.TextPatch(layers=[layer], source_prompt=SOURCE)):
        got = wan_call(wan_pipe)
    assert (want - stock).abs().max() > 1e-3
    assert (got - want).abs().max() < 1e-5


def test_text_patch_with_head_guidance_in_one_apply(wan_pipe):
    guidance = da.HeadGuidance(heads=["L1H1", "L2H0"], scale=2.0, u=1.0)
    with CallRecorder(wan_pipe) as alone, da.apply(wan_pipe, guidance):
        guided = wan_call(wan_pipe)
    with CallRecorder(wan_pipe) as rec, da.apply(wan_pipe, guidance, da.TextPatch(layers=[0, 1], source_prompt=PROMPT)):
        own = wan_call(wan_pipe)
    with da.apply(wan_pipe, guidance, da.TextPatch(layers=[0, 1], source_prompt=SOURCE)):
        other = wan_call(wan_pipe)
    assert len(rec.calls) == len(alone.calls) == 4
    assert (own - guided).abs().max() < 1e-5  # the perturbed branch is patched from a perturbed run of the source
    assert (other - guided).abs().max() > 1e-3


def test_text_guard_patches_quoted_words_only(wan_pipe):
    quoted, plain = 'a sign that says "cat"', PROMPT
    stock = {p: wan_call(wan_pipe, prompt=p) for p in (quoted, plain)}
    with da.apply(wan_pipe, da.TextPatch(layers=[0, 1], source_prompt='a sign that says "dog"')):
        patched = wan_call(wan_pipe, prompt=quoted)
    with CallRecorder(wan_pipe) as rec, da.apply(wan_pipe, da.TextGuard(blocklist=("cat",), replacement="dog", layers=(0, 1))):
        guarded = wan_call(wan_pipe, prompt=quoted)
        assert torch.equal(wan_call(wan_pipe, prompt=plain), stock[plain])
    assert len(rec.calls) == 8
    assert (guarded - stock[quoted]).abs().max() > 1e-3
    assert (guarded - patched).abs().max() < 1e-6

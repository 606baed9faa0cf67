"""HunyuanVideo 1.5 (text- and image-to-video): the processors reproduce diffusers exactly under the pipeline's
context mask (fp32 and bf16); SoftPAG equals independent SDPA perturbations inside the module (joint scope and
the video→video scope); a guided step equals the explicit computation from recorded stock calls with the
pipeline guider's own combination (CFG on and off, APG, batch 1 and 2, image-to-video) and, end to end,
diffusers' own PAG guider; calls are widened at the call, so a step makes the stock number of calls; 3-D local
windows against the dense-mask reference."""
import pytest
import torch
import torch.nn.functional as F
from diffusers import AdaptiveProjectedGuidance, ClassifierFreeGuidance
from PIL import Image
from torch.overrides import TorchFunctionMode

import dit_attn as da
from dit_attn import limits, processors
from dit_attn.families import family_of
from dit_attn.processors.state import EditState
from dit_attn.toy.hunyuan_video15 import (HUNYUAN_VIDEO15_RUN, build_hunyuan_video15_i2v_pipeline,
                                          build_hunyuan_video15_pipeline)

from .conftest import CallRecorder, PerturbSDPA, replay

torch.set_num_threads(1)
HEADS = [1, 3]
PROMPTS = ["a red circle", "a blue square cat"]
NEGATIVE = ["blurry", "dark"]
VIDEO_TOKENS = 3 * 4 * 4  # 3 latent frames of 4×4 tokens at HUNYUAN_VIDEO15_RUN


@pytest.fixture(scope="module")
def hv_pipe():
    pipe = build_hunyuan_video15_pipeline(num_layers=3, num_heads=4, head_dim=8, guidance_scale=4.0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def hv_call(pipe, prompt="a red circle", steps=2, seed=0, size=HUNYUAN_VIDEO15_RUN, **kwargs):
    args = dict(num_inference_steps=steps, output_type="latent", **size)
    args.update(kwargs)
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), **args).frames


def recorded(pipe, **kwargs):
    with CallRecorder(pipe) as rec:
        hv_call(pipe, **kwargs)
    return rec


def attention_module(pipe, layer):
    return pipe.transformer.transformer_blocks[layer].attn


class PerturbVideoSDPA(TorchFunctionMode):
    """Independent SoftPAG at u = 1 with scope "image" in one attention module: for the selected heads, each
    video query's logits over the video keys keep only its own key (identity), its logits over the context
    keys and the mask are kept; context queries keep their output."""

    def __init__(self, module, heads, video_tokens):
        super().__init__()
        self.heads, self.video, self.inside = list(heads), video_tokens, False
        self.handles = [module.register_forward_pre_hook(lambda *a: self._set(True)),
                        module.register_forward_hook(lambda *a: self._set(False))]

    def _set(self, value):
        self.inside = value

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.scaled_dot_product_attention and self.inside:
            named = dict(zip(("query", "key", "value", "attn_mask"), args)) | kwargs
            q, k, v = (named[n][:, self.heads] for n in ("query", "key", "value"))
            mask = named["attn_mask"]
            logits = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
            logits = logits.masked_fill(~mask, float("-inf"))[..., :self.video, :]
            n = self.video
            logits[..., :n] = logits[..., :n].masked_fill(~torch.eye(n, dtype=torch.bool), float("-inf"))
            out = out.clone()
            out[:, self.heads, :n] = (torch.softmax(logits, dim=-1) @ v).to(out.dtype)
        return out

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return super().__exit__(*exc)


def test_layers_and_family(hv_pipe):
    assert [(l.index, l.name, l.kind, l.heads, l.head_dim) for l in da.layers(hv_pipe)] == [
        (i, f"transformer_blocks.{i}.attn", "double", 4, 8) for i in range(3)]
    spec = family_of(hv_pipe.transformer)
    assert spec.name == "hunyuan_video15" and spec.makes_videos and spec.widen_at_call


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_processors_bit_exact_under_the_mask(hv_pipe, dtype):
    calls = recorded(hv_pipe, prompt=PROMPTS, negative_prompt=NEGATIVE).calls
    assert all(not c["encoder_attention_mask"].all() for c in calls)  # every call carries context padding
    transformer = hv_pipe.transformer.to(dtype)
    try:
        calls = [{k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in c.items()}
                 for c in calls]
        stock = [replay(transformer, c) for c in calls]
        originals = processors.install(transformer, EditState())
        try:
            assert type(transformer.transformer_blocks[1].attn.processor).__name__ == "HunyuanVideo15AttnProcessor"
            refiner = transformer.context_embedder.token_refiner.refiner_blocks[0].attn
            assert type(refiner.processor).__name__ == "AttnProcessor2_0"  # the token refiner is not a layer
            mine = [replay(transformer, c) for c in calls]
        finally:
            processors.restore(transformer, originals)
        assert all((a - b).abs().max() == 0.0 for a, b in zip(stock, mine))
    finally:
        transformer.to(torch.float32)


def test_kernel_path_reproduces_stock_attention(hv_pipe):
    """The processor's own math through dit-attn's kernels (under its key mask) equals stock."""
    call = recorded(hv_pipe, prompt=PROMPTS).calls[0]
    stock = replay(hv_pipe.transformer, call)
    with da.apply(hv_pipe.transformer, da.SoftPAG(heads=["L0H1", "L2"], u=1e-30)):
        got = replay(hv_pipe.transformer, call)
    assert (got - stock).abs().max() < 1e-5


def test_softpag_u0_bit_exact_in_pipeline(hv_pipe):
    stock = hv_call(hv_pipe, negative_prompt="blurry")
    with da.apply(hv_pipe, da.SoftPAG(heads=["L1", "L2"], u=0.0)):
        assert torch.equal(hv_call(hv_pipe, negative_prompt="blurry"), stock)
    with da.apply(hv_pipe, da.SoftPAG(heads=["L1H0"], u=1.0)):
        assert not torch.equal(hv_call(hv_pipe, negative_prompt="blurry"), stock)
    assert torch.equal(hv_call(hv_pipe, negative_prompt="blurry"), stock)


# uniform on the last layer only: the reference's uniform rows of context padding (which see no key) are NaN
@pytest.mark.parametrize("layer,target", [(0, "identity"), (1, "identity"), (2, "uniform")])
def test_softpag_equals_an_sdpa_perturbation_inside_the_module(hv_pipe, layer, target):
    call = recorded(hv_pipe, prompt=PROMPTS).calls[0]
    with PerturbSDPA(attention_module(hv_pipe, layer), HEADS, target):
        want = replay(hv_pipe.transformer, call)
    with da.apply(hv_pipe.transformer, da.SoftPAG([(layer, h) for h in HEADS], u=1.0, target=target)):
        got = replay(hv_pipe.transformer, call)
    assert (got - want).abs().max() < 1e-5
    assert (got - replay(hv_pipe.transformer, call)).abs().max() > 1e-4


@pytest.mark.parametrize("layer", [0, 2])
def test_video_scope_softpag_equals_a_video_block_perturbation(hv_pipe, layer):
    call = recorded(hv_pipe, prompt=PROMPTS).calls[0]
    with PerturbVideoSDPA(attention_module(hv_pipe, layer), HEADS, VIDEO_TOKENS):
        want = replay(hv_pipe.transformer, call)
    with da.apply(hv_pipe.transformer, da.SoftPAG([(layer, h) for h in HEADS], u=1.0, scope="image")):
        got = replay(hv_pipe.transformer, call)
    assert (got - want).abs().max() < 1e-5
    with da.apply(hv_pipe.transformer, da.SoftPAG([(layer, h) for h in HEADS], u=1.0)):
        assert (got - replay(hv_pipe.transformer, call)).abs().max() > 1e-4  # the scope matters


def explicit_steps(pipe, rec, edit, layer_heads: dict, steps: int):
    """ε the scheduler should get at each step: a fresh guider of the pipeline's config (APG's momentum runs
    over these steps) combining the recorded conditional and unconditional calls (none when it makes one call
    a step), then s·(ε_c − ε_p)."""
    guider = type(pipe.guider)(**dict(pipe.guider.config))
    per_step = len(rec.calls) // steps
    out = []
    for step in range(steps):
        cond = rec.calls[per_step * step]
        eps_c = replay(pipe.transformer, cond)
        modes = [PerturbSDPA(attention_module(pipe, layer), heads) for layer, heads in layer_heads.items()]
        for mode in modes:
            mode.__enter__()
        try:
            eps_p = replay(pipe.transformer, cond)
        finally:
            for mode in reversed(modes):
                mode.__exit__(None, None, None)
        base = eps_c
        if per_step == 2:
            guider.set_state(step=step, num_inference_steps=steps, timestep=cond["timestep"][0])
            if step == 0:
                guider.prepare_inputs({"encoder_hidden_states": (cond["encoder_hidden_states"], None)})
            base = guider.forward(eps_c, replay(pipe.transformer, rec.calls[per_step * step + 1])).pred
        out.append(base + edit.scale * (eps_c - eps_p))
    return out


def check_guided_steps(pipe, calls_per_step, layer_heads, steps=2, **kwargs):
    edit = da.HeadGuidance(heads=[(layer, h) for layer, heads in layer_heads.items() for h in heads], scale=2.0, u=1.0)
    with CallRecorder(pipe) as stock:
        hv_call(pipe, steps=steps, **kwargs)
    with CallRecorder(pipe) as rec, da.apply(pipe, edit):
        hv_call(pipe, steps=steps, **kwargs)
    assert len(rec.calls) == len(stock.calls) == calls_per_step * len(rec.steps) == calls_per_step * steps
    assert (rec.steps[0] - stock.steps[0]).abs().max() > 1e-3  # same input: the difference is the guidance term
    if calls_per_step == 2:  # the conditional call comes first in each step
        assert not torch.equal(rec.calls[0]["encoder_hidden_states"], rec.calls[1]["encoder_hidden_states"])
    for eps, expected in zip(rec.steps, explicit_steps(pipe, rec, edit, layer_heads, steps)):
        assert (eps - expected).abs().max() < 1e-5
    return rec


@pytest.mark.parametrize("guider,prompt", [
    (ClassifierFreeGuidance(guidance_scale=4.0), "a red circle"),
    (ClassifierFreeGuidance(guidance_scale=4.0), PROMPTS),
    (ClassifierFreeGuidance(guidance_scale=1.0), "a red circle"),  # CFG off: one "pred_cond" call a step
    (ClassifierFreeGuidance(guidance_scale=1.0), PROMPTS),
    (AdaptiveProjectedGuidance(guidance_scale=4.0, adaptive_projected_guidance_momentum=-0.5), PROMPTS),
])
def test_guided_step_equals_explicit(hv_pipe, monkeypatch, guider, prompt):
    monkeypatch.setattr(hv_pipe, "guider", guider)
    cfg = guider.guidance_scale > 1.0
    negative = (NEGATIVE if isinstance(prompt, list) else "blurry") if cfg else None
    steps = 3 if isinstance(guider, AdaptiveProjectedGuidance) else 2
    check_guided_steps(hv_pipe, 2 if cfg else 1, {1: [1], 2: [0]}, steps=steps, prompt=prompt, negative_prompt=negative)


def test_whole_layer_guidance_equals_diffusers_pag_guider(hv_pipe, monkeypatch):
    """Every head of block 1 at u = 1 under the CFG guider is diffusers' own PAG guider on that block (its
    attention scores skipped). 0.42.1's guider hook refuses the stock processor (not in its registry): it is
    registered for this test. PAG skips its first step (start < step strictly): HeadGuidance starts at 1/3."""
    from diffusers import PerturbedAttentionGuidance
    from diffusers.hooks._helpers import AttentionProcessorMetadata, AttentionProcessorRegistry
    from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15AttnProcessor2_0

    def skipped(attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        return hidden_states, encoder_hidden_states

    AttentionProcessorRegistry._register()
    monkeypatch.setitem(AttentionProcessorRegistry._registry, HunyuanVideo15AttnProcessor2_0,
                        AttentionProcessorMetadata(skip_processor_output_fn=skipped))
    kwargs = dict(prompt=PROMPTS, negative_prompt=NEGATIVE, steps=3)
    monkeypatch.setattr(hv_pipe, "guider", PerturbedAttentionGuidance(
        guidance_scale=4.0, perturbed_guidance_scale=2.0, perturbed_guidance_start=0.0, perturbed_guidance_stop=1.0,
        perturbed_guidance_layers=[1]))
    with CallRecorder(hv_pipe) as theirs_calls:
        theirs = hv_call(hv_pipe, **kwargs)
    monkeypatch.setattr(hv_pipe, "guider", ClassifierFreeGuidance(guidance_scale=4.0))
    with CallRecorder(hv_pipe) as ours_calls, da.apply(hv_pipe, da.HeadGuidance(heads=["L1"], scale=2.0, start=0.3)):
        ours = hv_call(hv_pipe, **kwargs)
    assert (len(theirs_calls.calls), len(ours_calls.calls)) == (8, 6)  # PAG: a third call at steps 1 and 2
    assert (ours - theirs).abs().max() < 1e-5
    assert (hv_call(hv_pipe, **kwargs) - theirs).abs().max() > 1e-3


def test_image_to_video_guided_step_equals_explicit():
    """The image context (SigLIP states, unmasked) rides in each row's context; the call's per-row image states
    are widened with the rest."""
    pipe = build_hunyuan_video15_i2v_pipeline(num_layers=2, num_heads=4, head_dim=8, guidance_scale=3.0)
    pipe.set_progress_bar_config(disable=True)
    image = Image.new("RGB", (16, 16), (200, 30, 30))
    size = dict(num_frames=HUNYUAN_VIDEO15_RUN["num_frames"])  # height and width: the image's
    rec = check_guided_steps(pipe, 2, {0: [1], 1: [0, 2]}, prompt=PROMPTS, negative_prompt=NEGATIVE, image=image,
                             size=size)
    assert rec.calls[0]["image_embeds"].abs().sum() > 0


def test_row_count_guard_and_refusals(hv_pipe, monkeypatch):
    spec = family_of(hv_pipe.transformer)
    with pytest.raises(ValueError, match=r"video grid .* needs radius=\(frames, height, width\)"):
        with da.apply(hv_pipe, da.LocalAttention(radius=2.0, layers=[1])):
            hv_call(hv_pipe)
    monkeypatch.setattr(type(spec), "widen_at_call", False)  # declared wrongly: rows forked at blocks get folded
    with pytest.raises(RuntimeError, match="returned 1 rows for a call widened to 2: this model does not carry extra rows"):
        with da.apply(hv_pipe, da.HeadGuidance(heads=["L1H1"], scale=2.0)):
            hv_call(hv_pipe, negative_prompt="blurry")


def test_shared_prefix_equals_unshared(hv_pipe):
    """Widened at the call, so there is no prefix to share: share_prefix changes nothing, calls stay stock."""
    stock_calls = len(recorded(hv_pipe, negative_prompt="blurry").calls)
    results = {}
    for share in (True, False):
        with CallRecorder(hv_pipe) as rec, \
                da.apply(hv_pipe, da.HeadGuidance(heads=["L2H0", "L1H3"], scale=3.0, u=0.7, share_prefix=share)):
            results[share] = hv_call(hv_pipe, negative_prompt="blurry")
        assert len(rec.calls) == stock_calls
    assert (results[True] - results[False]).abs().max() < 1e-5


def test_presets_of_other_families_are_refused_clearly(hv_pipe):
    with pytest.raises(ValueError, match="is for flux models, this is a hunyuan_video15 model"):
        da.apply(hv_pipe, da.SoftPAG(["flux:glossy"]))


def test_remove_restores_original_objects(hv_pipe):
    transformer = hv_pipe.transformer
    before = dict(transformer.attn_processors)
    handle = da.apply(hv_pipe, da.HeadGuidance(heads=["L0H1", "L2"]))
    assert transformer.transformer_blocks[2].attn.processor is not before["transformer_blocks.2.attn.processor"]
    handle.remove()
    handle.remove()
    assert all(transformer.attn_processors[k] is v for k, v in before.items())
    assert "step" not in vars(hv_pipe.scheduler)
    assert not transformer._diffusers_hook.hooks


@pytest.mark.parametrize("with_softpag", [False, True])
def test_local_attention_3d_equals_the_dense_mask_reference(hv_pipe, with_softpag):
    """Video queries see the video keys inside the ellipsoid and every valid context key."""
    kwargs = dict(prompt=PROMPTS, negative_prompt=NEGATIVE)
    call = recorded(hv_pipe, **kwargs).calls[0]
    assert family_of(hv_pipe.transformer).grid(hv_pipe.transformer, call) == ((3, 4, 4), "")
    extra = (da.SoftPAG(heads=["L1H2", "L2H0"], u=0.5, scope="image"),) if with_softpag else ()
    out = {}
    for backend in ("tiled", "reference"):
        with da.apply(hv_pipe, da.LocalAttention(radius=(1.5, 2.0, 2.5), layers=[1, 2], backend=backend), *extra):
            out[backend] = hv_call(hv_pipe, **kwargs)
    stock = hv_call(hv_pipe, **kwargs)
    assert (out["tiled"] - out["reference"]).abs().max() < 1e-4
    assert (out["tiled"] - stock).abs().max() > 1e-4
    if not with_softpag:
        with da.apply(hv_pipe, da.LocalAttention(radius=(100.0, 100.0, 100.0), layers=[1, 2], backend="tiled")):
            assert torch.equal(hv_call(hv_pipe, **kwargs), stock)  # an ellipsoid covering the grid is stock attention


def test_size_limits_are_the_video_vae_s(hv_pipe):
    """Sides are whole tokens of the video VAE's spatial factor (4 here: the pipeline names it
    `vae_scale_factor_spatial`), frames its temporal rule (2k + 1)."""
    limits.check_video_size(hv_pipe, 5, 20, 12)
    with pytest.raises(ValueError, match="height must be a multiple of 4 px on this model"):
        limits.check_video_size(hv_pipe, 5, 18, 16)
    with pytest.raises(ValueError, match="num_frames must be 2k \\+ 1 on this model"):
        limits.check_video_size(hv_pipe, 4, 16, 16)

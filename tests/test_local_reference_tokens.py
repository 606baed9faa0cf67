"""LocalAttention on FLUX.1 Kontext calls, whose reference-image tokens follow the generated ones.

The generated image's queries see the generated keys inside their circle on the generated grid, every
text key and every reference key; text and reference queries see everything. The reference is the
stock model with that dense mask handed to SDPA inside the local layer, built here from the call's
own position ids.
"""
import pytest
import torch
import torch.nn.functional as F
from diffusers import FluxKontextPipeline
from PIL import Image
from torch.overrides import TorchFunctionMode

import dit_attn as da
from dit_attn.kernels import AttentionPlan, LocalWindow, choose_backend

from .conftest import CallRecorder, flux_attention_module, replay

RADIUS = 2.5


@pytest.fixture(scope="module")
def kontext():
    from dit_attn.toy.configs import build_flux_pipeline

    flux = build_flux_pipeline(num_layers=2, num_single_layers=2, num_heads=2, head_dim=16)
    pipe = FluxKontextPipeline(**{k: v for k, v in flux.components.items() if k in (
        "transformer", "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")})
    pipe.set_progress_bar_config(disable=True)
    with CallRecorder(pipe) as rec:  # a 48×32 image from a 32×32 reference: 12×8 and 8×8 token grids
        pipe(prompt="make it red", image=Image.new("RGB", (32, 32), (30, 160, 40)), num_inference_steps=1,
             guidance_scale=3.5, height=48, width=32, max_sequence_length=8, output_type="latent",
             max_area=48 * 32, _auto_resize=False, generator=torch.Generator().manual_seed(0))
    return pipe, rec.calls[0]


def kontext_mask(call, radius: float) -> torch.Tensor:
    """(S, S) keep-mask over [text ; generated ; reference] from the position ids."""
    text, ids = call["txt_ids"].shape[0], call["img_ids"]
    generated = ids[:, 0] == 0
    assert generated.any() and not generated.all()  # the call has both kinds of tokens
    seq = text + ids.shape[0]
    ys, xs = ids[:, 1], ids[:, 2]
    in_circle = (ys[:, None] - ys[None, :]) ** 2 + (xs[:, None] - xs[None, :]) ** 2 < radius**2
    keep = torch.ones(seq, seq, dtype=torch.bool)
    both_generated = generated[:, None] & generated[None, :]
    keep[text:, text:] = ~both_generated | in_circle
    return keep


class MaskedSDPA(TorchFunctionMode):
    """Every SDPA call inside `module` runs with the keep-mask `mask`."""

    def __init__(self, module, mask):
        super().__init__()
        self.mask, self.inside = mask, False
        self.handles = [module.register_forward_pre_hook(lambda *a: setattr(self, "inside", True)),
                        module.register_forward_hook(lambda *a: setattr(self, "inside", False))]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is F.scaled_dot_product_attention and self.inside:
            kwargs["attn_mask"] = self.mask
        return func(*args, **kwargs)

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return super().__exit__(*exc)


@pytest.mark.parametrize("layer", [1, 3])  # a double block and a single block
def test_reference_tiled_and_flex_equal_the_dense_mask(kontext, layer, monkeypatch):
    monkeypatch.setenv("DIT_ATTN_FLEX_COMPILE", "0")  # eager flex: compiling it on the CPU takes longer than the test
    pipe, call = kontext
    transformer = pipe.transformer
    stock = replay(transformer, call)
    with MaskedSDPA(flux_attention_module(pipe, layer), kontext_mask(call, RADIUS)):
        want = replay(transformer, call)
    assert (want - stock).abs().max() > 1e-4  # the window cuts keys
    for backend in ("reference", "tiled", "flex"):
        with da.apply(transformer, da.LocalAttention(radius=RADIUS, layers=[layer], backend=backend)):
            got = replay(transformer, call)
        assert (got - want).abs().max() < 1e-5, backend


def test_a_radius_covering_the_generated_grid_is_stock(kontext):
    pipe, call = kontext
    stock = replay(pipe.transformer, call)
    with da.apply(pipe.transformer, da.LocalAttention(radius=14.0, backend="tiled")):  # 11² + 7² < 14²: the 12×8 grid fits
        assert (replay(pipe.transformer, call) - stock).abs().max() < 1e-5


def test_downsampled_keys_pool_the_generated_grid_only(kontext):
    pipe, call = kontext
    edit = dict(radius=1.5, layers=[0, 2], downsample=2)
    with da.apply(pipe.transformer, da.LocalAttention(backend="reference", **edit)):
        reference = replay(pipe.transformer, call)
    with da.apply(pipe.transformer, da.LocalAttention(backend="tiled", **edit)):
        assert (replay(pipe.transformer, call) - reference).abs().max() < 1e-5


def test_triton_declines_a_grid_with_tokens_after_it():
    q = torch.zeros(1, 2, 10, 16)
    plan = AttentionPlan((), (2, 8), LocalWindow(1.5, (2, 3)))
    with pytest.raises(ValueError, match="reference-image tokens follow it"):
        choose_backend(q, plan, "triton")
    assert choose_backend(q, plan).name == "tiled"


def test_reference_tokens_before_the_generated_ones_are_refused_clearly(kontext):
    pipe, call = kontext
    ids = call["img_ids"]
    swapped = dict(call, img_ids=torch.cat([ids[ids[:, 0] != 0], ids[ids[:, 0] == 0]]))
    with da.apply(pipe.transformer, da.LocalAttention(radius=RADIUS, layers=[1])):
        with pytest.raises(ValueError, match="are not all after the generated ones"):
            replay(pipe.transformer, swapped)

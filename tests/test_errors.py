"""Bad input fails early with a message naming what is valid."""
import pytest
import torch
from diffusers import StableDiffusion3PAGPipeline

import dit_attn as da
from dit_attn.heads import PRESETS, resolve_heads
from dit_attn.toy.configs import pipeline_components


@pytest.mark.parametrize(
    "heads,message",
    [
        (["L7H0"], r"layer 7 .*out of range: this model has layers 0-2"),
        (["L1H9"], r"head 9 of layer 1 .*out of range: valid heads are 0-3"),
        ([(3, 0)], r"layer 3 .*layers 0-2"),
        (["sd3:dark"], r"layer 1 .*head 10|head 10 of layer 1"),
    ],
)
def test_unknown_layer_or_head(sd3_pipe, heads, message):
    with pytest.raises(ValueError, match=message):
        da.apply(sd3_pipe, da.HeadGuidance(heads=heads))
    assert "transformer_blocks.0.attn.processor" in sd3_pipe.transformer.attn_processors
    assert not hasattr(sd3_pipe.transformer, "_dit_attn_handle")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(u=1.5), r"u must be a number in \[0, 1\]"),
        (dict(u=-0.1), r"u must be a number in \[0, 1\]"),
        (dict(scale=-1.0), r"scale must be a finite number >= 0"),
        (dict(start=0.5, end=0.5), r"start must be < end"),
        (dict(start=0.8, end=0.2), r"start must be < end"),
        (dict(end=1.5), r"end must be a number in \[0, 1\]"),
        (dict(target="blur"), r"target must be one of \('identity', 'uniform'\)"),
        (dict(scope="text"), r"scope must be one of \('joint', 'image'\)"),
    ],
)
def test_bad_edit_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        da.HeadGuidance(heads=["L0"], **kwargs)


def test_bad_head_syntax():
    with pytest.raises(ValueError, match=r"use 'L<layer>H<head>'"):
        da.SoftPAG(heads=["layer1"])
    with pytest.raises(TypeError, match=r"\(layer, head\) tuple"):
        da.SoftPAG(heads=[1.5])
    with pytest.raises(ValueError, match="no heads selected"):
        resolve_heads([], [])


def test_unsupported_classes(sd3_pipe):
    with pytest.raises(TypeError, match="supported: SD3Transformer2DModel, FluxTransformer2DModel"):
        da.apply(torch.nn.Linear(2, 2), da.SoftPAG(heads=["L0"]))
    with pytest.raises(TypeError, match="expected a diffusers pipeline or transformer"):
        da.apply("a pipeline", da.SoftPAG(heads=["L0"]))
    pag = StableDiffusion3PAGPipeline(**pipeline_components(sd3_pipe), pag_applied_layers=["blocks.1"])
    with pytest.raises(TypeError, match="supported pipelines: StableDiffusion3Pipeline"):
        da.apply(pag, da.HeadGuidance(heads=["L0"]))
    with pytest.raises(TypeError, match="HeadGuidance needs a pipeline"):
        da.apply(sd3_pipe.transformer, da.HeadGuidance(heads=["L0"]))
    with pytest.raises(TypeError, match="not an edit"):
        da.apply(sd3_pipe, "L0H1")
    with pytest.raises(ValueError, match="at most one HeadGuidance"):
        da.apply(sd3_pipe, da.HeadGuidance(heads=["L0"]), da.HeadGuidance(heads=["L1"]))


def test_second_apply_refused_until_removed(sd3_pipe):
    handle = da.apply(sd3_pipe, da.SoftPAG(heads=["L0H1"]))
    with pytest.raises(RuntimeError, match="call remove\\(\\) on the first handle"):
        da.apply(sd3_pipe, da.HeadGuidance(heads=["L1"]))
    with pytest.raises(RuntimeError, match="already edited"):
        da.apply(sd3_pipe.transformer, da.SoftPAG(heads=["L1"]))
    handle.remove()
    da.apply(sd3_pipe, da.HeadGuidance(heads=["L1"])).remove()


def test_presets_and_head_forms():
    assert PRESETS["sd3:dark"].heads == ("L1H2", "L1H10")
    layers = [da.LayerInfo(i, f"transformer_blocks.{i}.attn", "joint", 24, 64) for i in range(24)]
    resolved = resolve_heads(["sd3:golden-hour", (0, 17), "L5"], layers)
    assert resolved == {0: (17,), 2: (3,), 5: tuple(range(24)), 18: (11,)}


def test_model_specific_preset_only_on_its_layout():
    tiny = [da.LayerInfo(i, f"transformer_blocks.{i}.attn", "joint", 6, 32) for i in range(6)]
    assert resolve_heads(["tiny:red"], tiny, "sd3") == {0: (1,), 1: (4,)}
    assert resolve_heads(["tiny:yellow"], tiny, "sd3") == {4: (3, 5), 5: (0, 3)}
    sd3_medium = [da.LayerInfo(i, f"transformer_blocks.{i}.attn", "joint", 24, 64) for i in range(24)]
    with pytest.raises(ValueError, match="found on a model of 6 layers x 6 heads, this one has 24 x 24"):
        resolve_heads(["tiny:red"], sd3_medium, "sd3")


def test_preset_of_another_family(flux_pipe):
    with pytest.raises(ValueError, match="preset 'sd3:dark' is for sd3 models, this is a flux model; its presets: flux:glossy"):
        da.apply(flux_pipe, da.SoftPAG(heads=["sd3:dark"]))


def test_non_stock_processors_are_not_replaced_silently(sd3_pipe):
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    class AdapterProcessor(JointAttnProcessor2_0):
        pass

    transformer = sd3_pipe.transformer
    original = transformer.transformer_blocks[1].attn.processor
    transformer.transformer_blocks[1].attn.set_processor(AdapterProcessor())
    try:
        with pytest.raises(TypeError, match="transformer_blocks.1.attn has a AdapterProcessor; .*JointAttnProcessor2_0"):
            da.apply(sd3_pipe, da.SoftPAG(heads=["L0"]))
    finally:
        transformer.transformer_blocks[1].attn.set_processor(original)


def test_unsupported_diffusers_version_is_refused_before_anything_changes(sd3_pipe, monkeypatch):
    import diffusers

    before = dict(sd3_pipe.transformer.attn_processors)
    monkeypatch.setattr(diffusers, "__version__", "0.43.0")
    with pytest.raises(RuntimeError, match=r"diffusers >=0.42,<0.43; this is diffusers 0.43.0"):
        da.apply(sd3_pipe, da.SoftPAG(heads=["L0H0"]))
    assert sd3_pipe.transformer.attn_processors == before


@pytest.mark.parametrize("heads", [[], (), " , "])
def test_edits_need_at_least_one_head(heads):
    from dit_attn.io import parse_heads

    heads = parse_heads(heads) if isinstance(heads, str) else heads
    for edit in (da.SoftPAG, da.HeadGuidance):
        with pytest.raises(ValueError, match="needs at least one head"):
            edit(heads=heads)

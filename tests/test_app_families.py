"""The app on saved Qwen-Image, Z-Image and FLUX.2 Klein pipelines: Generate is the stock run, Compare's difference is
|without − with| scaled, the heads picker lists each model's layer map, and the Sets tab makes FLUX.2 / Qwen-Image sets."""
import importlib
import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from dit_attn.app import ModelRegistry
from dit_attn.app.ui import AppActions

BUILDERS = {
    "qwen_image": ("dit_attn.toy.qwen_image", "build_qwen_image_pipeline"),
    "z_image": ("dit_attn.toy.z_image", "build_z_image_pipeline"),
    "flux2_klein": ("dit_attn.toy.flux2", "build_flux2_klein_pipeline"),
}
PROMPT, STEPS, CFG, SEED = "a red circle", 2, 4.5, 3


def no_progress(*args, **kwargs):
    return None


def form(model, heads=""):
    """generate/compare inputs: model, prompt, steps, cfg, seed, size, heads, picked, presets, u, scope, target,
    pag_scale, local_radius."""
    return [model, PROMPT, STEPS, CFG, SEED, "32", heads, [], [], 1.0, "joint", "identity", 3.0, None]


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("family-models")
    paths = {}
    for family, (module, builder) in BUILDERS.items():
        getattr(importlib.import_module(module), builder)().save_pretrained(root / family)
        paths[family] = str(root / family)
    return paths


@pytest.fixture(scope="module")
def actions(dirs, tmp_path_factory):
    registry = ModelRegistry(list(dirs.values()), embedded=(), max_loaded=len(dirs))
    return AppActions(registry, str(tmp_path_factory.mktemp("family-out")))


@pytest.fixture(scope="module")
def stock(dirs):
    """Independent copies of the saved pipelines, loaded by diffusers itself."""
    pipes = {}
    for family, path in dirs.items():
        pipes[family] = DiffusionPipeline.from_pretrained(path)
        pipes[family].set_progress_bar_config(disable=True)
    return pipes


def stock_image(pipe, **call) -> np.ndarray:
    image = pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(SEED), num_inference_steps=STEPS,
                 guidance_scale=CFG, height=32, width=32, **call).images[0]
    return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("family", list(BUILDERS))
def test_generate_is_the_stock_run(family, dirs, actions, stock):
    path, settings = actions.generate(*form(dirs[family]), progress=no_progress)
    assert np.array_equal(pixels(path), stock_image(stock[family]))
    assert json.loads(Image.open(path).text["dit-attn"])["model"] == dirs[family] and settings["edits"] == []


@pytest.mark.parametrize("family", list(BUILDERS))
def test_compare_shows_the_stock_image_the_edited_one_and_their_scaled_difference(family, dirs, actions, stock):
    without, edited, difference, summary = actions.compare(*form(dirs[family], heads="L1"), progress=no_progress)
    assert np.array_equal(pixels(without), stock_image(stock[family]))
    diff = np.abs(pixels(without).astype(np.int16) - pixels(edited).astype(np.int16))
    peak = int(diff.max())
    assert peak > 0 and f"Largest pixel difference: {peak}/255" in summary
    assert np.array_equal(pixels(difference), np.clip(np.rint(diff * (255.0 / peak)), 0, 255).astype(np.uint8))


def expected_heads(pipe) -> list[str]:
    """L<layer>H<head> of every attention layer, counted from the transformer's config."""
    config = pipe.transformer.config
    if "n_layers" in config:  # Z-Image: the main layers (the refiners are not layers of the map)
        layers, heads = config.n_layers, config.n_heads
    else:
        layers = config.num_layers + config.get("num_single_layers", 0)
        heads = config.num_attention_heads
    return [f"L{i}H{h}" for i in range(layers) for h in range(heads)]


@pytest.mark.parametrize("family", list(BUILDERS))
def test_heads_picker_lists_the_models_layer_map(family, dirs, actions, stock):
    picker, presets, summary, text_layers = actions.model_changed(dirs[family])
    assert picker["choices"] == expected_heads(stock[family])
    assert summary.startswith(f"{type(stock[family]).__name__} (") and text_layers == ""


@pytest.mark.parametrize("family", ["flux2_klein", "qwen_image"])
def test_sets_tab_canvas_is_the_stock_call_with_the_joint_caption(family, dirs, actions, stock):
    canvas, panels, caption = actions.sets(dirs[family], STEPS, CFG, SEED, "64x32", "1x2", "a red circle\na blue square",
                                           "PAIR", "", None, 0, progress=no_progress)
    assert "a red circle" in caption and "a blue square" in caption
    call = dict(prompt=caption, height=32, width=64, num_inference_steps=STEPS, guidance_scale=CFG)
    if family == "flux2_klein":  # the seed draws the stock pipeline's own noise
        image = stock[family](generator=torch.Generator().manual_seed(SEED), **call).images[0]
    else:  # packed (1, 4·8, 4·4) latent tokens
        image = stock[family](latents=torch.randn(1, 32, 16, generator=torch.Generator().manual_seed(SEED)), **call).images[0]
    assert np.array_equal(pixels(canvas), np.asarray(image.convert("RGB")))
    assert [pixels(p).tolist() for p in panels] == [pixels(canvas)[:, :32].tolist(), pixels(canvas)[:, 32:].tolist()]

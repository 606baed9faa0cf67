"""Capture on calls with reference-image tokens after the generated ones (FLUX.1 Kontext, FLUX.2 with a
reference image, Qwen-Image-Edit): the maps cover the generated tokens only. Checked against dense softmax
maps built here from the q and k each layer hands to its attention call; the reference tokens take their
share of every softmax but are neither map rows nor map columns."""
import pytest
import torch

import dit_attn as da

from .test_capture import AttentionInputs, cross_of, dense_map
from .test_local_reference_tokens import RADIUS, flux2, kontext, kontext_mask, qwen_edit, qwen_edit_mask  # noqa: F401

MODELS = {  # fixture, generated grid, (text tokens, reference tokens), the dense keep-mask of a local layer
    "kontext": ((12, 8), (8, 64), kontext_mask),
    "flux2": ((6, 4), (8, 64), kontext_mask),
    "qwen_edit": ((6, 4), (6, 16), qwen_edit_mask),
}
LOCAL_LAYER = 1
LOCATIONS = [(0, 0), (5, 3)]


@pytest.mark.parametrize("model", sorted(MODELS))
def test_cross_and_self_maps_cover_the_generated_tokens(model, request, monkeypatch):
    pipe, call, kwargs = request.getfixturevalue(model)
    grid, (text_len, references), keep_of = MODELS[model]
    generated = grid[0] * grid[1]
    run = lambda: pipe(num_inference_steps=1, generator=torch.Generator().manual_seed(0), **kwargs).images  # noqa: E731
    local = da.LocalAttention(radius=RADIUS, layers=[LOCAL_LAYER])
    with da.apply(pipe, local):
        plain = run()
    spy = AttentionInputs(monkeypatch)
    with da.apply(pipe, local, da.Capture()) as handle:
        assert torch.equal(run(), plain)
        cross = handle.maps
    with da.apply(pipe, local, da.Capture(kind="self", tokens=LOCATIONS)) as handle:
        run()
        self_maps = handle.maps
    layers = len(da.layers(pipe))
    assert cross.grid == self_maps.grid == grid
    assert cross.maps.shape == (1, layers, 2, text_len, *grid) and cross.tokens == tuple(f"t{i}" for i in range(text_len))
    image = slice(text_len, text_len + generated)
    for layer, (q, k, mask) in enumerate(spy.calls[:layers]):
        assert q.shape[2] == text_len + generated + references
        keep = keep_of(call, RADIUS) if layer == LOCAL_LAYER else None
        full = dense_map(q, k, mask, keep=keep)
        expected = cross_of(full, image, list(range(text_len)), grid)[0]
        assert (cross.maps[0, layer] - expected).abs().max() < 1e-6, layer
        for t, (y, x) in enumerate(LOCATIONS):
            row = full[0, :, text_len + y * grid[1] + x, image].unflatten(-1, grid).float()
            assert (self_maps.maps[0, layer, :, t] - row).abs().max() < 1e-6, (layer, t)

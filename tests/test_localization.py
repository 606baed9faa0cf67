"""Text-layer localization: TextPatch checked against stock diffusers runs with the text
projections swapped by plain torch hooks, localize / edit_text / TextGuard / localized LoRA."""
import json

import pytest
import torch
from PIL import Image

import dit_attn as da
from dit_attn.localization import localized_lora_modules, save_lora, sign_pairs, ssim, ssim_score
from dit_attn.localization.prompts import guarded_prompt, with_quoted_text
from dit_attn.toy.configs import build_flux_pipeline, build_sd3_pipeline

from .conftest import SIZE, CallRecorder, flux_call, replay, sd3_call

# Rows computed in a wider batch (the source rows ride along) round differently: float32 GEMM
# blocking depends on the batch and the CPU (1.7e-6 seen with AVX-512). A patch moves ≥ 1e-4.
ROUNDING = 1e-5

PROMPT, SOURCE = "a red circle", "a blue square"


def family_call(family):
    return flux_call if family == "flux" else sd3_call


def text_projections(transformer, layers):
    """(module, single) for each projection whose text output a TextPatch replaces."""
    info = da.layers(transformer)
    out = []
    for layer in layers:
        attn = transformer.get_submodule(info[layer].name)
        single = info[layer].kind == "single"
        out += [(attn.to_k, True), (attn.to_v, True)] if single else [(attn.add_k_proj, False), (attn.add_v_proj, False)]
    return out


def encode(pipe, prompt):
    """The source prompt's text inputs, from diffusers' own encode_prompt: (embeds, pooled)."""
    with torch.no_grad():
        if "Flux" not in type(pipe).__name__:
            embeds, _, pooled, _ = pipe.encode_prompt(prompt, None, None, do_classifier_free_guidance=False, max_sequence_length=8)
        else:
            embeds, pooled, _ = pipe.encode_prompt(prompt, None, max_sequence_length=8)
    return embeds, pooled


def source_call(call, cond, embeds, pooled):
    """The recorded call restricted to the conditional rows, with the source prompt's text."""
    kwargs = dict(call)
    for key in ("hidden_states", "timestep", "guidance"):
        if isinstance(kwargs.get(key), torch.Tensor) and kwargs[key].ndim > 0:
            kwargs[key] = kwargs[key][cond]
    n = kwargs["hidden_states"].shape[0]
    kwargs["encoder_hidden_states"] = embeds.expand(n, -1, -1)
    kwargs["pooled_projections"] = pooled.expand(n, -1)
    return kwargs


def explicit_patched(transformer, call, cond, source_kwargs, layers):
    """Stock transformer on `call`, the cond rows' text K/V projections replaced (forward
    hooks) by those of a separate stock run on `source_kwargs`."""
    projections = text_projections(transformer, layers)
    text_len = call["encoder_hidden_states"].shape[1]
    captured = {}
    hooks = [m.register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, out.clone())) for i, (m, _) in enumerate(projections)]
    try:
        replay(transformer, source_kwargs)
    finally:
        for h in hooks:
            h.remove()

    def swap(i, single):
        def hook(module, args, out):
            out = out.clone()
            if single:
                out[cond, :text_len] = captured[i][:, :text_len]
            else:
                out[cond] = captured[i]
            return out
        return hook

    hooks = [m.register_forward_hook(swap(i, single)) for i, (m, single) in enumerate(projections)]
    try:
        return replay(transformer, call)
    finally:
        for h in hooks:
            h.remove()


# ---------------------------------------------------------------------------- patching


@pytest.mark.parametrize("family,layers", [("sd3", (1,)), ("sd35", (0, 2)), ("flux", (1,)), ("flux", (3,)), ("flux", (0, 2))])
def test_patch_with_own_prompt_equals_stock(family, layers, request):
    pipe = request.getfixturevalue(f"{family}_pipe")
    call = family_call(family)
    stock = call(pipe, PROMPT)
    with da.apply(pipe, da.TextPatch(layers=layers, source_prompt=PROMPT)):
        patched = call(pipe, PROMPT)
    assert (patched - stock).abs().max() <= ROUNDING
    with da.apply(pipe, da.TextPatch(layers=layers, source_prompt=SOURCE)):
        other = call(pipe, PROMPT)
    assert (other - stock).abs().max() > 1e-4


@pytest.mark.parametrize("family,layers,cfg", [
    ("sd3", (1,), 4.0), ("sd35", (2,), 4.0), ("sd3", (0, 1), 1.0),
    ("flux", (1,), None),  # double block
    ("flux", (2, 3), None),  # single blocks: the text slice of to_k / to_v
])
def test_patched_steps_equal_explicit_swap(family, layers, cfg, request):
    pipe = request.getfixturevalue(f"{family}_pipe")
    kwargs = {"guidance_scale": cfg} if cfg is not None else {}
    with CallRecorder(pipe) as rec, da.apply(pipe, da.TextPatch(layers=layers, source_prompt=SOURCE)):
        family_call(family)(pipe, PROMPT, **kwargs)
    embeds, pooled = encode(pipe, SOURCE)
    assert len(rec.calls) == len(rec.steps) == 3
    for call, got in zip(rec.calls, rec.steps):
        n = call["hidden_states"].shape[0]
        cond = list(range(n // 2, n)) if cfg and cfg > 1 else list(range(n))
        eps = explicit_patched(pipe.transformer, call, cond, source_call(call, cond, embeds, pooled), layers)
        if cfg and cfg > 1:
            eps = eps[: n // 2] + cfg * (eps[n // 2:] - eps[: n // 2])
        assert (got - eps).abs().max() <= 1e-5


@pytest.mark.parametrize("family,module", [("sd3", "transformer_blocks.1.attn.add_k_proj"), ("flux", "single_transformer_blocks.1.attn.to_v")])
def test_batched_source_rows_equal_separate_source_run(family, module, request):
    pipe = request.getfixturevalue(f"{family}_pipe")
    layer = 1 if family == "sd3" else 3
    target = pipe.transformer.get_submodule(module)
    seen = []
    hook = target.register_forward_hook(lambda m, a, out: seen.append(out.clone()))
    try:
        with CallRecorder(pipe) as rec, da.apply(pipe, da.TextPatch(layers=[layer], source_prompt=SOURCE)):
            family_call(family)(pipe, PROMPT, steps=1)
        batched = seen[0]
        seen.clear()
        call = rec.calls[0]
        n = call["hidden_states"].shape[0]
        cond = list(range(n // 2, n)) if family == "sd3" else list(range(n))
        replay(pipe.transformer, source_call(call, cond, *encode(pipe, SOURCE)))
        separate = seen[0]
    finally:
        hook.remove()
    assert batched.shape[0] == n + len(cond)  # stock rows + one source row per conditional row
    assert (batched[n:] - separate).abs().max() <= ROUNDING


def block_outputs(pipe, family, edit=None):
    blocks = list(pipe.transformer.transformer_blocks) + list(getattr(pipe.transformer, "single_transformer_blocks", ()))
    outputs = []
    hooks = [b.register_forward_hook(lambda m, a, out: outputs.append(tuple(o.clone() if o is not None else None for o in out))) for b in blocks]
    try:
        if edit is None:
            family_call(family)(pipe, PROMPT, steps=1)
        else:
            with da.apply(pipe, edit):
                family_call(family)(pipe, PROMPT, steps=1)
    finally:
        for h in hooks:
            h.remove()
    return outputs


@pytest.mark.parametrize("family,layer", [("sd3", 1), ("flux", 2)])
def test_patch_changes_only_what_follows_the_layer(family, layer, request):
    pipe = request.getfixturevalue(f"{family}_pipe")
    stock = block_outputs(pipe, family)
    patched = block_outputs(pipe, family, da.TextPatch(layers=[layer], source_prompt=SOURCE))
    rows = stock[0][1].shape[0]
    n_cond = rows // 2 if family == "sd3" else rows
    for i, (a, b) in enumerate(zip(stock, patched)):
        image_a, image_b = a[1], b[1][:rows]  # blocks return (text, image)
        if i < layer:
            assert b[1].shape[0] == rows + n_cond  # the source rows ride along up to the patched layer
            assert (image_a - image_b).abs().max() <= ROUNDING
        elif i == layer:
            assert (image_a - image_b).abs().max() > 1e-4
        else:
            assert b[1].shape[0] == rows  # and not beyond it
    if family == "sd3":  # CFG's unconditional rows are never patched
        assert (stock[layer][1][: rows // 2] - patched[layer][1][: rows // 2]).abs().max() <= ROUNDING


def test_start_fraction(sd3_pipe):
    with CallRecorder(sd3_pipe) as stock:
        sd3_call(sd3_pipe, PROMPT, steps=4)
    with CallRecorder(sd3_pipe) as patched, da.apply(sd3_pipe, da.TextPatch(layers=[1], source_prompt=SOURCE, start=0.5)):
        sd3_call(sd3_pipe, PROMPT, steps=4)
    assert torch.equal(stock.steps[0], patched.steps[0]) and torch.equal(stock.steps[1], patched.steps[1])
    assert (stock.steps[2] - patched.steps[2]).abs().max() > 1e-4


def test_flux_true_cfg_patches_only_the_conditional_call(flux_pipe):
    batches = []
    hook = flux_pipe.transformer.transformer_blocks[0].register_forward_pre_hook(
        lambda m, a, kw: batches.append(kw["hidden_states"].shape[0]), with_kwargs=True)
    try:
        with da.apply(flux_pipe, da.TextPatch(layers=[1], source_prompt=SOURCE)):
            flux_call(flux_pipe, PROMPT, steps=2, negative_prompt="dark", true_cfg_scale=2.0)
    finally:
        hook.remove()
    assert batches == [2, 1, 2, 1]  # cond call + source row, then the stock negative call


def test_flux_img2img_true_cfg_without_cache_contexts(flux_pipe):
    import numpy as np
    from diffusers import FluxImg2ImgPipeline

    image = Image.fromarray((np.random.default_rng(1).random((32, 32, 3)) * 255).astype("uint8"))
    pipe = FluxImg2ImgPipeline(**flux_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    batches = []
    hook = pipe.transformer.transformer_blocks[0].register_forward_pre_hook(
        lambda m, a, kw: batches.append(kw["hidden_states"].shape[0]), with_kwargs=True)
    try:
        with da.apply(pipe, da.TextPatch(layers=[1], source_prompt=SOURCE)):
            pipe(PROMPT, image=image, strength=0.8, num_inference_steps=4, negative_prompt="blurry", true_cfg_scale=2.0,
                 max_sequence_length=8, output_type="latent", generator=torch.Generator().manual_seed(0), **SIZE)
    finally:
        hook.remove()
    assert len(batches) >= 4 and batches == [2, 1] * (len(batches) // 2)  # the first call of a step is the conditional one


def test_with_local_attention(sd3_pipe):
    local = da.LocalAttention(radius=3)
    with da.apply(sd3_pipe, local):
        alone = sd3_call(sd3_pipe, PROMPT)
    with da.apply(sd3_pipe, local, da.TextPatch(layers=[0, 2], source_prompt=PROMPT)):
        both = sd3_call(sd3_pipe, PROMPT)
    assert (both - alone).abs().max() <= ROUNDING


def test_with_head_guidance(sd3_pipe, flux_pipe):
    for pipe, call in ((sd3_pipe, sd3_call), (flux_pipe, flux_call)):
        guidance = da.HeadGuidance(heads=["L0H1", "L2"], scale=2.0, u=0.5)
        with da.apply(pipe, guidance):
            guided = call(pipe, PROMPT)
        with da.apply(pipe, guidance, da.TextPatch(layers=[1], source_prompt=PROMPT)):
            both = call(pipe, PROMPT)
        assert (both - guided).abs().max() <= 1e-5
        with CallRecorder(pipe) as stock_calls:
            call(pipe, PROMPT)
        with CallRecorder(pipe) as rec, da.apply(pipe, guidance, da.TextPatch(layers=[1], source_prompt=SOURCE)):
            call(pipe, PROMPT)
        assert len(rec.calls) == len(stock_calls.calls)


# ---------------------------------------------------------------------------- guard


def test_guarded_prompt():
    assert guarded_prompt('a sign that says "Bad" here, bad', ("bad",), "****") == 'a sign that says "****" here, bad'
    assert guarded_prompt('a sign that says "badge"', ("bad",), "****") is None
    assert guarded_prompt("no quotes: bad", ("bad",), "****") is None
    assert with_quoted_text('a sign that says "A" in red', "B") == 'a sign that says "B" in red'


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_guard_leaves_clean_prompts_untouched(family, request):
    pipe = request.getfixturevalue(f"{family}_pipe")
    call = family_call(family)
    clean, blocked = 'a sign that says "A"', 'a sign that says "X"'
    stock, stock_clean, stock_pair = call(pipe, [clean, blocked]), call(pipe, clean), call(pipe, [clean, clean])
    guard = da.TextGuard(blocklist=["x"], replacement="O", layers=[1])
    with da.apply(pipe, guard):
        assert torch.equal(call(pipe, clean), stock_clean)
        assert torch.equal(call(pipe, [clean, clean]), stock_pair)  # a batch with nothing blocked is the stock batch
        both = call(pipe, [clean, blocked])
    with da.apply(pipe, da.TextPatch(layers=[1], source_prompt='a sign that says "O"')):
        explicit = call(pipe, [blocked, blocked])  # same batch shape: row 1 gets the same noise
    assert (both[:1] - stock[:1]).abs().max() <= ROUNDING  # the clean row stays stock next to a guarded one
    assert (both[1:] - explicit[1:]).abs().max() <= ROUNDING
    assert (both[1:] - stock[1:]).abs().max() > 1e-4
    assert "check_inputs" not in vars(pipe)  # unwrapped on remove


def test_guard_needs_prompt_text(sd3_pipe):
    embeds, _, pooled, _ = sd3_pipe.encode_prompt("a", None, None, do_classifier_free_guidance=False, max_sequence_length=8)
    with da.apply(sd3_pipe, da.TextGuard(blocklist=["x"], layers=[0])), pytest.raises(ValueError, match="prompt text"):
        sd3_call(sd3_pipe, None, prompt_embeds=embeds, pooled_prompt_embeds=pooled, guidance_scale=1.0)


# ---------------------------------------------------------------------------- localize / edit


def pixel_images(pipe, prompt, seeds, steps, *edits):
    """(len(seeds), 3, H, W) in [0, 1] from one stock pipeline call (the edits applied around it)."""
    def run():
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        return pipe([prompt] * len(seeds), generator=generators, num_inference_steps=steps, output_type="pt",
                    max_sequence_length=8, **SIZE).images.float()
    if not edits:
        return run()
    with da.apply(pipe, *edits):
        return run()


TIGHT = 1e-6  # the same pipeline calls at the same batch shape: the samples agree to float32 rounding


def parameter_share(transformer, prefixes) -> float:
    """Share of the transformer's parameters under the named modules, counted from named_parameters."""
    named = dict(transformer.named_parameters())
    return sum(p.numel() for n, p in named.items() if n.startswith(tuple(prefixes))) / sum(p.numel() for p in named.values())


def test_localize_ranks_layers_and_writes_results(sd3_pipe, tmp_path):
    # this source ranks the layers in reverse order, with gaps well above float32 rounding
    pairs = [(PROMPT, PROMPT), (PROMPT, "a green triangle")]
    result = da.localize(sd3_pipe, pairs, score=ssim_score, seeds=[0, 1], num_inference_steps=2, out=str(tmp_path),
                         progress=False, max_sequence_length=8, **SIZE)
    assert [s.layers for s in result.scores] == [(0,), (1,), (2,)]
    assert result.baseline == {"ssim": pytest.approx(1.0, abs=1e-6), "score": pytest.approx(1.0, abs=1e-6)}
    # the reference: each (pair, seed) sample recomputed from separate pipeline calls and SSIM to the stock images
    originals = pixel_images(sd3_pipe, PROMPT, [0, 1], 2)
    expected = {}
    for layer in range(3):
        samples = torch.cat([ssim(pixel_images(sd3_pipe, PROMPT, [0, 1], 2, da.TextPatch(layers=[layer], source_prompt=source)),
                                  originals) for _, source in pairs])
        expected[f"L{layer}"] = samples.tolist()
    for s in result.scores:
        assert s.samples == pytest.approx(expected[s.label], abs=TIGHT)
        assert s.samples[:2] == pytest.approx([1.0, 1.0], abs=1e-5)  # patching with the prompt itself
        assert max(s.samples[2:]) < 1 - 5e-5  # patching with the other prompt changes the image
        assert s.score == pytest.approx(sum(expected[s.label]) / 4, abs=TIGHT)
        block = f"transformer_blocks.{s.layers[0]}."
        assert s.text_kv_share == pytest.approx(parameter_share(sd3_pipe.transformer, [block + "attn.add_k_proj.", block + "attn.add_v_proj."]))
        assert s.block_share == pytest.approx(parameter_share(sd3_pipe.transformer, [block]))
    means = {label: sum(v) / len(v) for label, v in expected.items()}
    ranking = sorted(means, key=means.get, reverse=True)
    assert min(means[a] - means[b] for a, b in zip(ranking, ranking[1:])) > 2 * TIGHT  # a ranking TIGHT cannot flip
    assert [s.label for s in result.ranking] == ranking and result.top.label == ranking[0]
    data = json.loads((tmp_path / "localization.json").read_text())
    assert data["ranking"] == ranking and len(data["scores"]) == 3
    assert {k: data["settings"][k] for k in ("seeds", "num_inference_steps", "guidance_scale", "height", "width")} == \
        {"seeds": [0, 1], "num_inference_steps": 2, "guidance_scale": None, "height": 32, "width": 32}
    assert data["settings"]["pipeline_kwargs"] == {"max_sequence_length": 8}
    assert Image.open(tmp_path / "localization.png").size[0] >= 3 * 26
    assert not list(tmp_path.glob(".partial-*"))


def test_localize_default_score_on_flux_groups(flux_pipe):
    from dit_attn.toy.judge import CLASSES, probabilities

    pairs = sign_pairs(1)
    result = da.localize(flux_pipe, pairs, layers=[[0, 1], 3], num_inference_steps=1, progress=False, max_sequence_length=8,
                         **SIZE)
    assert [s.layers for s in result.scores] == [(0, 1), (3,)]
    assert set(result.scores[0].components) == {"score", "glyph", "ssim"}
    pair = pairs[0]
    glyph_index = CLASSES["glyph"].index(pair.source_prompt.split('"')[1])  # the source sign's character
    originals = pixel_images(flux_pipe, pair.prompt, [0], 1)
    for s in result.scores:  # the judge's probability of the source glyph × SSIM to the stock image, computed here
        patched = pixel_images(flux_pipe, pair.prompt, [0], 1, da.TextPatch(layers=list(s.layers), source_prompt=pair.source_prompt))
        glyph = float(probabilities(patched)["glyph"][0, glyph_index])
        similarity = float(ssim(patched, originals)[0])
        assert s.components["glyph"] == pytest.approx(glyph, abs=1e-5)
        assert s.components["ssim"] == pytest.approx(similarity, abs=1e-5)
        assert s.score == pytest.approx(glyph * similarity, abs=1e-5) and s.samples == pytest.approx([glyph * similarity], abs=1e-5)


def test_edit_text(sd3_pipe):
    prompt = 'a sign that says "A" in red on a white background'
    same = da.edit_text(sd3_pipe, prompt, "A", layers=[1], num_inference_steps=2, max_sequence_length=8, **SIZE)
    assert same.source_prompt == prompt and same.seed == 0  # the default generator: seed 0
    stock = sd3_pipe(prompt, generator=torch.Generator().manual_seed(0), num_inference_steps=2, max_sequence_length=8, **SIZE).images[0]
    assert same.original.tobytes() == stock.tobytes()
    assert same.edited.tobytes() == stock.tobytes()
    edit = da.edit_text(sd3_pipe, prompt, "B", layers=[1], num_inference_steps=2, max_sequence_length=8, **SIZE)
    assert edit.source_prompt == prompt.replace('"A"', '"B"')
    assert edit.edited.tobytes() != stock.tobytes()
    assert edit.side_by_side.size == (64, 32)


def test_edit_text_starts_both_images_from_the_generators_state(sd3_pipe):
    """The original uses the generator given, the edited twin a copy of the state it had: with the
    prompt's own text patched in, both images are the stock image of that generator state."""
    prompt = 'a sign that says "A" in red on a white background'
    run = dict(num_inference_steps=2, guidance_scale=2.0, max_sequence_length=8, **SIZE)
    generator = torch.Generator().manual_seed(5)
    torch.randn(3, generator=generator)  # a state other than the seed's first
    state = generator.get_state()
    same = da.edit_text(sd3_pipe, prompt, "A", layers=[1], generator=generator, **run)
    stock = sd3_pipe(prompt, generator=torch.Generator().set_state(state), **run).images[0]
    assert same.original.tobytes() == stock.tobytes() and same.edited.tobytes() == stock.tobytes()
    assert same.seed == 5 and not torch.equal(generator.get_state(), state)  # the generator given was used
    fresh = da.edit_text(sd3_pipe, prompt, "A", layers=[1], generator=torch.Generator().manual_seed(5), **run)
    assert fresh.original.tobytes() != stock.tobytes()  # seed 5's first state is another image
    with pytest.raises(TypeError, match="generator must be one torch.Generator"):
        da.edit_text(sd3_pipe, prompt, "B", layers=[1], generator=5)
    for old, new in [("seed", "generator"), ("steps", "num_inference_steps"), ("cfg", "guidance_scale"),
                     ("size", "height and width")]:
        with pytest.raises(TypeError, match=f"edit_text\\(\\) takes {new}.*not '{old}'"):
            da.edit_text(sd3_pipe, prompt, "B", layers=[1], **{old: 1})
        with pytest.raises(TypeError, match=f"localize\\(\\) takes {new}.*not '{old}'"):
            da.localize(sd3_pipe, [(PROMPT, SOURCE)], score=ssim_score, **{old: 1})


def windowed_ssim(a, b, size=11, sigma=1.5):
    """SSIM (Wang et al. 2004) of two (C, H, W) arrays from the definition: every valid 11×11 window's
    Gaussian-weighted means, variances and covariance, K1 = 0.01, K2 = 0.03, averaged over windows and channels."""
    import numpy as np

    r = np.arange(size) - (size - 1) / 2
    w = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma**2))
    w /= w.sum()
    wa, wb = (np.lib.stride_tricks.sliding_window_view(np.asarray(t, dtype=np.float64), (size, size), axis=(1, 2)) for t in (a, b))
    mean_a, mean_b = (np.einsum("chwij,ij->chw", t, w) for t in (wa, wb))
    da_, db_ = wa - mean_a[..., None, None], wb - mean_b[..., None, None]
    var_a, var_b, cov = (np.einsum("chwij,ij->chw", p, w) for p in (da_ * da_, db_ * db_, da_ * db_))
    c1, c2 = 0.01**2, 0.03**2
    value = (2 * mean_a * mean_b + c1) * (2 * cov + c2) / ((mean_a**2 + mean_b**2 + c1) * (var_a + var_b + c2))
    return float(value.mean())


def test_ssim_properties():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g)
    assert torch.allclose(ssim(x, x), torch.ones(2))
    noisy = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    assert (ssim(x, noisy) < 0.9).all() and torch.allclose(ssim(x, noisy), ssim(noisy, x))
    blurred = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    for other in (noisy, blurred, 1 - x):
        got = ssim(x, other)
        for i in range(2):
            assert float(got[i]) == pytest.approx(windowed_ssim(x[i].numpy(), other[i].numpy()), abs=1e-6)


# ---------------------------------------------------------------------------- LoRA


def lora_names(transformer):
    return sorted({n.rsplit(".lora_", 1)[0] for n, _ in transformer.named_parameters() if ".lora_" in n})


@pytest.mark.parametrize("family,layers,targets,expected", [
    ("sd3", [1], ["to_q", "to_out.0", "add_k_proj"],
     ["transformer_blocks.1.attn.add_k_proj", "transformer_blocks.1.attn.to_out.0", "transformer_blocks.1.attn.to_q"]),
    ("flux", [0, 2], ["to_k", "to_out.0", "proj_mlp"],
     ["single_transformer_blocks.0.attn.to_k", "single_transformer_blocks.0.proj_mlp", "transformer_blocks.0.attn.to_k",
      "transformer_blocks.0.attn.to_out.0"]),
])
def test_lora_targets_exactly_the_requested_modules(family, layers, targets, expected):
    pipe = build_flux_pipeline(num_layers=2, num_single_layers=2, num_heads=4, head_dim=8) if family == "flux" \
        else build_sd3_pipeline(num_layers=3, num_heads=4, head_dim=8)
    assert sorted(localized_lora_modules(pipe, layers, targets)) == sorted(expected)
    pipe.transformer.add_adapter(da.localized_lora_config(pipe, layers, rank=2, targets=targets))
    assert lora_names(pipe.transformer) == sorted(expected)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_lora_reloads_with_alpha(family, tmp_path):
    def build():
        pipe = build_flux_pipeline(num_layers=2, num_single_layers=2, num_heads=4, head_dim=8) if family == "flux" \
            else build_sd3_pipeline(num_layers=3, num_heads=4, head_dim=8)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    call = family_call(family)
    pipe = build()
    layers = [1, 2] if family == "flux" else [1]
    pipe.transformer.add_adapter(da.localized_lora_config(pipe, layers, rank=4, alpha=8))
    with torch.no_grad():
        for name, p in pipe.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    trained = call(pipe, PROMPT, steps=2)
    save_lora(pipe, tmp_path)
    fresh = build()
    stock = call(fresh, PROMPT, steps=2)
    fresh.load_lora_weights(str(tmp_path))
    assert lora_names(fresh.transformer) == lora_names(pipe.transformer)
    reloaded = call(fresh, PROMPT, steps=2)
    assert (reloaded - trained).abs().max() <= 1e-6
    assert (stock - trained).abs().max() > 1e-4


# ---------------------------------------------------------------------------- errors


def test_invalid_layers_and_pairs_give_clear_errors(sd3_pipe, flux_pipe):
    with pytest.raises(ValueError, match="non-empty list of layer indices"):
        da.TextPatch(layers=[], source_prompt="x")
    with pytest.raises(ValueError, match="non-empty list of layer indices"):
        da.TextPatch(layers=[-1], source_prompt="x")
    with pytest.raises(ValueError, match="source_prompt"):
        da.TextPatch(layers=[0], source_prompt=" ")
    with pytest.raises(ValueError, match="start must be < 1"):
        da.TextPatch(layers=[0], source_prompt="x", start=1.0)
    with pytest.raises(ValueError, match=r"layers \[3\] do not exist: this model has layers 0-2"):
        da.apply(sd3_pipe, da.TextPatch(layers=[3], source_prompt="x"))
    with pytest.raises(TypeError, match="needs a pipeline"):
        da.apply(sd3_pipe.transformer, da.TextPatch(layers=[0], source_prompt="x"))
    with pytest.raises(ValueError, match="at most one TextPatch or TextGuard"):
        da.apply(sd3_pipe, da.TextPatch(layers=[0], source_prompt="x"), da.TextGuard(["x"], layers=[0]))
    with pytest.raises(ValueError, match="needs layers"):
        da.TextGuard(["x"])
    with pytest.raises(ValueError, match="blocklist"):
        da.TextGuard([], layers=[0])
    with pytest.raises(ValueError, match="at least one"):
        da.localize(sd3_pipe, [], score=ssim_score)
    with pytest.raises(TypeError, match="pairs"):
        da.localize(sd3_pipe, ("a", "b"), score=ssim_score)
    with pytest.raises(ValueError, match=r"layers \[9\] do not exist: this model has layers 0-3"):
        da.localize(flux_pipe, [("a", "b")], layers=[9], score=ssim_score)
    with pytest.raises(ValueError, match="no quoted text"):
        da.edit_text(sd3_pipe, "a red circle", "B", layers=[0])
    with pytest.raises(ValueError, match=r"layers \[7\] do not exist"):
        da.edit_text(sd3_pipe, 'a sign that says "A"', "B", layers=[7])
    with pytest.raises(ValueError, match=r"layers \[5\] do not exist: this model has layers 0-2"):
        da.localized_lora_config(sd3_pipe, [5])
    with pytest.raises(ValueError, match="name no Linear module"):
        da.localized_lora_config(sd3_pipe, [0], targets=["to_z"])
    assert getattr(sd3_pipe.transformer, "_dit_attn_handle", None) is None or not sd3_pipe.transformer._dit_attn_handle.active


# ---------------------------------------------------------------------------- CLI


def test_cli_localize_and_edit_text(tmp_path, capsys):
    from dit_attn.cli import main

    out = tmp_path / "loc"
    assert main(["localize", "--pair", PROMPT, SOURCE, "--layers", "0,2", "--steps", "1", "--size", "32",
                 "--score", "ssim", "--out", str(out)]) == 0
    data = json.loads((out / "localization.json").read_text())
    assert [s["layers"] for s in data["scores"]] == [[0], [2]]
    assert (out / "localization.png").exists()
    edit_out = tmp_path / "edit"
    assert main(["edit-text", 'a sign that says "A"', "--text", "B", "--layers", "1", "--num-inference-steps", "1",
                 "--guidance-scale", "2.0", "--seed", "4", "--size", "32", "--out", str(edit_out)]) == 0
    side = Image.open(edit_out / "side_by_side.png")
    assert side.size == (64, 32)
    settings = json.loads(side.text["dit-attn"])
    assert settings["source_prompt"] == 'a sign that says "B"'
    assert {k: settings[k] for k in ("seed", "num_inference_steps", "guidance_scale", "height", "width")} == \
        {"seed": 4, "num_inference_steps": 1, "guidance_scale": 2.0, "height": 32, "width": 32}
    assert not {"steps", "cfg", "size"} & set(settings)
    data = json.loads((out / "localization.json").read_text())  # --steps: the older flag
    assert (data["settings"]["num_inference_steps"], data["settings"]["height"]) == (1, 32)
    assert main(["localize", "--steps", "1", "--out", str(out)]) == 2
    assert "pair" in capsys.readouterr().err


def test_row_plan_with_guidance_and_patch():
    from dit_attn.processors.state import plan_rows

    # rows [uncond, cond]; the cond row's source is appended as row 2 and runs up to layer 2;
    # guidance copies the cond row (and, while it runs, its source row) from layer 1 on
    plan = plan_rows(2, sources={1: 2}, patch_end=2, cond=torch.tensor([1]), fork_layer=1)
    first, forked, final = plan.stages
    assert (first.layer, first.select.tolist(), first.is_call_rows) == (0, [0, 1, 2], True)
    assert (first.patch_targets.tolist(), first.patch_sources.tolist()) == ([1], [2])
    assert forked.layer == 1 and forked.select.tolist() == [0, 1, 2, 1, 2]
    assert forked.perturbed_of.tolist() == [-1, -1, -1, 0, 0]
    assert (forked.patch_targets.tolist(), forked.patch_sources.tolist()) == ([1, 3], [2, 4])
    assert (final.layer, final.select.tolist(), final.from_call.tolist()) == (2, [0, 1, 3], [0, 1, 1])
    assert final.perturbed.tolist() == [False, False, True] and final.patch_targets.numel() == 0
    assert plan.stage_at(5) is final and plan.stage_at(0.5) is first


# ---------------------------------------------------------------------------- train-lora


def small_sign_data(directory, n=4):
    from dit_attn.train.lora import write_sign_data

    write_sign_data(str(directory), n)
    for path in directory.glob("*.png"):  # the tiny test pipelines draw 32×32 images
        Image.open(path).resize((32, 32)).save(path)
    return str(directory)


def test_train_lora_resumes_and_reloads(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from dit_attn.train.lora import LoraTrainConfig, train_lora

    def build():
        pipe = build_sd3_pipeline(num_layers=3, num_heads=4, head_dim=8)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    data = small_sign_data(tmp_path / "data")
    cfg = LoraTrainConfig(layers=(1,), targets=("to_q", "add_k_proj"), rank=2, alpha=4.0, steps=4, batch=2, lr=1e-2,
                          warmup=2, max_sequence_length=8, checkpoint_every=1)
    pipe = build()
    whole = train_lora(pipe, cfg, data, str(tmp_path / "w1"), str(tmp_path / "lora1"))
    assert not getattr(pipe.transformer, "peft_config", None)  # the pipeline is left without the LoRA
    assert whole["layers"] == [1] and whole["lora_parameters"] == 2 * 2 * (32 + 32)
    clip, calls = torch.nn.utils.clip_grad_norm_, []

    def crash_in_step_3(*args, **kwargs):  # a run killed after its step-2 checkpoint
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return clip(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", crash_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        train_lora(build(), cfg, data, str(tmp_path / "w2"), str(tmp_path / "lora2"))
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    assert torch.load(tmp_path / "w2" / "state.pt")["step"] == 2
    resumed = train_lora(build(), cfg, data, str(tmp_path / "w2"), str(tmp_path / "lora2"))
    assert resumed["losses"] == pytest.approx(whole["losses"], abs=1e-6)
    a = load_file(tmp_path / "lora1" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "lora2" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() <= 1e-6 for k in a)
    assert {k.split(".lora")[0] for k in a} == {"transformer.transformer_blocks.1.attn.to_q", "transformer.transformer_blocks.1.attn.add_k_proj"}
    fresh = build()
    stock = sd3_call(fresh, PROMPT, steps=2)
    fresh.load_lora_weights(str(tmp_path / "lora1"))
    assert fresh.transformer.transformer_blocks[1].attn.to_q.scaling["default_0"] == 2.0  # alpha / rank kept
    assert (sd3_call(fresh, PROMPT, steps=2) - stock).abs().max() > 0


def test_train_lora_cli_errors(tmp_path, capsys):
    from dit_attn.cli import main

    assert main(["train-lora", "--mode", "localized", "--data", str(tmp_path), "--work", str(tmp_path / "w"),
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dit-attn train-lora: error: ") and "--layers" in err and err.count("\n") == 1
    assert main(["train-lora", "--layers", "1", "--data", str(tmp_path / "none"), "--work", str(tmp_path / "w"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "data directory not found" in capsys.readouterr().err


def test_ocr_score_plugs_in_a_reader():
    from dit_attn.localization import OCRScore, TextPair
    from dit_attn.localization.score import character_f1

    assert character_f1("HELLO", "hello") == 1.0 and character_f1("", "A") == 0.0
    assert character_f1("HELP", "HELLO") == pytest.approx(2 * (3 / 4) * (3 / 5) / (3 / 4 + 3 / 5))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    score = OCRScore(lambda pil: ["B", "x"] if len(pil) == 2 else None)
    pairs = [TextPair('a "A"', 'a "B"')] * 2
    out = score(images, images, pairs)
    assert out["ocr_f1"].tolist() == [1.0, 0.0] and torch.allclose(out["ssim"], torch.ones(2))
    assert torch.allclose(out["score"], torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="TrOCR"):
        OCRScore.trocr("/nonexistent/trocr")

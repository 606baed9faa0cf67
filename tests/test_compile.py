"""torch.compile(fullgraph=True) captures the edited transformer in one graph and computes the eager result."""
import pytest
import torch
import torch._dynamo

import dit_attn as da

from .conftest import CallRecorder, flux_call, sd3_call

EDITS = {
    "softpag u=0": lambda: (da.SoftPAG(["L1"], u=0.0),),
    "softpag": lambda: (da.SoftPAG(["L1H0", "L2"], u=0.7, scope="image", target="uniform"), da.SoftPAG(["L0H1"], u=1.0)),
    "local": lambda: (da.LocalAttention(radius=2.0, layers=[1, 2], backend="tiled"),),
}


def first_call(pipe, family):
    with CallRecorder(pipe) as rec:
        (sd3_call if family == "sd3" else flux_call)(pipe, steps=1)
    return {**rec.calls[0], "return_dict": False}


@pytest.fixture(scope="module")
def chroma_pipe():
    from dit_attn.toy.chroma import build_chroma_pipeline

    pipe = build_chroma_pipeline(num_layers=2, num_single_layers=2, num_heads=4, head_dim=8)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("family,edit", [("sd3", "softpag u=0"), ("sd3", "softpag"), ("sd3", "local"), ("flux", "softpag"),
                                         ("chroma", "softpag")])  # Chroma: under the pipeline's mask
def test_fullgraph_compile_equals_eager(family, edit, request):
    pipe = request.getfixturevalue(f"{family}_pipe")
    call = first_call(pipe, family)
    with torch.no_grad(), da.apply(pipe.transformer, *EDITS[edit]()):
        eager = pipe.transformer(**call)[0]
        torch._dynamo.reset()
        compiled = torch.compile(pipe.transformer, fullgraph=True, backend="aot_eager")
        got = compiled(**call)[0]
    torch._dynamo.reset()
    assert (got - eager).abs().max() < 1e-5
    if edit != "softpag u=0":
        with torch.no_grad():
            assert (got - pipe.transformer(**call)[0]).abs().max() > 1e-4  # the edit ran inside the graph


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_guided_calls_with_blocks_compiled_fullgraph_equal_eager(family):
    """HeadGuidance's guided calls (perturbed copies forked at a block) with every block compiled with
    fullgraph=True (diffusers' regional compilation): no graph break, the eager steps, and no recompile on
    the next generation. The row planning at the call runs outside the blocks."""
    from torch._dynamo.utils import counters

    from dit_attn.toy.configs import build_flux_pipeline, build_sd3_pipeline

    if family == "sd3":
        pipe, run = build_sd3_pipeline(num_layers=3, num_heads=4, head_dim=8, qk_norm="rms_norm"), sd3_call
    else:
        pipe, run = build_flux_pipeline(num_layers=2, num_single_layers=2, num_heads=4, head_dim=8), flux_call
    pipe.set_progress_bar_config(disable=True)
    edit = da.HeadGuidance(["L1H1", "L2"], scale=2.0, u=0.7)

    def guided_steps():
        with CallRecorder(pipe) as rec, da.apply(pipe, edit):
            run(pipe, steps=2)
        return rec.steps

    eager = guided_steps()
    with CallRecorder(pipe) as rec:
        run(pipe, steps=2)
    assert max((a - b).abs().max() for a, b in zip(eager, rec.steps)) > 1e-4  # guidance changes the steps
    torch._dynamo.reset()
    transformer = pipe.transformer
    for block in list(transformer.transformer_blocks) + list(getattr(transformer, "single_transformer_blocks", [])):
        block.compile(fullgraph=True, backend="aot_eager")
    counters.clear()
    try:
        compiled = guided_steps()
        graphs = counters["stats"]["unique_graphs"]
        again = guided_steps()
        assert counters["stats"]["unique_graphs"] == graphs  # the second generation reuses the graphs
        assert sum(counters["graph_break"].values()) == 0
    finally:
        torch._dynamo.reset()
    for got in (compiled, again):
        assert max((a - b).abs().max() for a, b in zip(got, eager)) < 1e-5


def _lora_state_dict(transformer, seed: int, rank: int = 4) -> dict:
    """A config-built LoRA on the double/joint blocks' to_q and to_v, in diffusers' PEFT key layout."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in transformer.named_modules():
        if name.startswith("transformer_blocks.") and name.endswith(("attn.to_q", "attn.to_v")):
            state[f"{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=g) * 0.1
            state[f"{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=g) * 0.1
    return state


@pytest.mark.parametrize("family,edit,fullgraph", [
    ("sd3", "softpag", True), ("sd3", "local", True), ("flux", "softpag", True),
    ("flux", "local", False),  # FLUX local attention reads its grid from the position ids outside the graph
])
def test_compiled_lora_hotswap_does_not_recompile(family, edit, fullgraph):
    """diffusers' LoRA hot-swap into a compiled, edited transformer: the swapped weights run in the same
    graphs (`error_on_recompile`) and give the eager output of each LoRA."""
    from dit_attn.toy.configs import build_flux_pipeline, build_sd3_pipeline

    if family == "sd3":
        pipe = build_sd3_pipeline(num_layers=2, num_heads=4, head_dim=8)
    else:
        pipe = build_flux_pipeline(num_layers=2, num_single_layers=1, num_heads=4, head_dim=8)
    pipe.set_progress_bar_config(disable=True)
    transformer, call = pipe.transformer, first_call(pipe, family)
    first, second = _lora_state_dict(transformer, 1), _lora_state_dict(transformer, 2)

    def swap(state):
        transformer.load_lora_adapter(dict(state), adapter_name="default", prefix=None, hotswap=True)

    transformer.enable_lora_hotswap(target_rank=8)
    transformer.load_lora_adapter(dict(first), adapter_name="default", prefix=None)
    edits = {"softpag": (da.SoftPAG(["L1H0"], u=1.0),),
             "local": (da.LocalAttention(radius=2.0, layers=[1], backend="tiled"),)}[edit]
    with torch.no_grad(), da.apply(transformer, *edits):
        eager_first = transformer(**call)[0]
        swap(second)
        eager_second = transformer(**call)[0]
        swap(first)
        torch._dynamo.reset()
        transformer.compile(fullgraph=fullgraph, backend="aot_eager")
        try:
            got_first = transformer(**call)[0]
            with torch._dynamo.config.patch(error_on_recompile=True):
                swap(second)
                got_second = transformer(**call)[0]
                swap(first)
                got_again = transformer(**call)[0]
        finally:
            torch._dynamo.reset()
    assert (eager_first - eager_second).abs().max() > 1e-3  # the two LoRAs differ
    for got, want in ((got_first, eager_first), (got_second, eager_second), (got_again, eager_first)):
        assert (got - want).abs().max() < 1e-5


def _local_family(family: str):
    """(pipe, first transformer call, LocalAttention) with a token grid larger than the window (4×4 … 8×8
    images, 2×4×4 and 3×8×8 videos), so the window path runs, not the stock attention of a covered grid."""
    import inspect

    from dit_attn.toy.chroma import build_chroma_pipeline
    from dit_attn.toy.configs import build_flux_pipeline, build_sd3_pipeline
    from dit_attn.toy.hunyuan_video15 import build_hunyuan_video15_pipeline
    from dit_attn.toy.qwen_image import build_qwen_image_pipeline
    from dit_attn.toy.wan import build_wan_pipeline

    build = {"sd3": lambda: build_sd3_pipeline(num_layers=2, num_heads=2, head_dim=8),
             "flux": lambda: build_flux_pipeline(num_layers=1, num_single_layers=1, num_heads=2, head_dim=8),
             "chroma": lambda: build_chroma_pipeline(num_layers=1, num_single_layers=1, num_heads=2, head_dim=8),
             "qwen_image": lambda: build_qwen_image_pipeline(num_layers=1),
             "wan": lambda: build_wan_pipeline(num_layers=1),
             "hunyuan_video15": lambda: build_hunyuan_video15_pipeline(num_layers=1)}[family]
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    video = hasattr(pipe, "vae_scale_factor_temporal")
    extra = {"num_frames": 5} if video else {}
    if "max_sequence_length" in inspect.signature(pipe.__call__).parameters:
        extra["max_sequence_length"] = 8
    size = 64 if family == "wan" else 32
    with CallRecorder(pipe) as rec:
        pipe("a red circle", num_inference_steps=1, height=size, width=size, output_type="latent",
             generator=torch.Generator().manual_seed(0), **extra)
    edit = da.LocalAttention(radius=(1.5, 2.0, 2.0) if video else 2.0, layers=[0], backend="tiled")
    return pipe, {**rec.calls[0], "return_dict": False}, edit


def _covers_grid_calls(monkeypatch) -> list[bool]:
    from dit_attn.kernels.window import LocalWindow, LocalWindow3D

    seen = []
    for cls in (LocalWindow, LocalWindow3D):
        def covers_grid(window, original=cls.covers_grid):
            seen.append(original(window))
            return seen[-1]
        monkeypatch.setattr(cls, "covers_grid", covers_grid)
    return seen


def _blocks(transformer):
    return [m for name in ("transformer_blocks", "single_transformer_blocks", "blocks")
            for m in getattr(transformer, name, [])]


@pytest.mark.parametrize("family", ["sd3", "qwen_image", "wan", "chroma", "hunyuan_video15"])  # FLUX.1: below
def test_local_attention_compiles_fullgraph_on_a_grid_it_does_not_cover(family, monkeypatch):
    """LocalAttention's window path (2-D and 3-D) inside torch.compile(fullgraph=True): the eager output and
    no recompile on the next call of the same configuration. Whole model where stock diffusers traces in one
    graph; a FLUX.1-layout transformer called without its pipeline reads its grid from the position ids'
    values, and HunyuanVideo 1.5 breaks in stock code, so there every block is compiled with fullgraph=True
    (diffusers' regional compile)."""
    from torch._dynamo.utils import counters

    pipe, call, edit = _local_family(family)
    transformer = pipe.transformer
    seen = _covers_grid_calls(monkeypatch)
    with torch.no_grad():
        stock = transformer(**call)[0]
        with da.apply(transformer, edit):
            eager = transformer(**call)[0]
            assert seen and not any(seen)  # the window path ran
            assert (eager - stock).abs().max() > 1e-4
            torch._dynamo.reset()
            counters.clear()
            whole = family in ("sd3", "qwen_image", "wan")
            if whole:
                compiled = torch.compile(transformer, fullgraph=True, backend="aot_eager")
            else:
                assert _blocks(transformer)
                for block in _blocks(transformer):
                    block.compile(fullgraph=True, backend="aot_eager")
                compiled = transformer
            try:
                got = compiled(**call)[0]
                with torch._dynamo.config.patch(error_on_recompile=True):
                    again = compiled(**call)[0]
                assert sum(counters["graph_break"].values()) == 0
            finally:
                torch._dynamo.reset()
                for block in _blocks(transformer):
                    block._compiled_call_impl = None
    for out in (got, again):
        assert (out - eager).abs().max() < 1e-5


def test_hunyuan_video15_local_attention_adds_no_break_to_stock():
    """Whole-model explain on HunyuanVideo 1.5 with 3-D local attention: every break is in stock diffusers'
    code (its data-dependent branch), none in dit-attn's."""
    pipe, call, edit = _local_family("hunyuan_video15")
    with da.apply(pipe.transformer, edit):
        torch._dynamo.reset()
        edited = torch._dynamo.explain(pipe.transformer)(**call)
    torch._dynamo.reset()
    assert edited.break_reasons  # stock's branch on torch.all(image_embeds == 0)
    for brk in edited.break_reasons:
        frame = brk.user_stack[-1].filename
        assert "/diffusers/" in frame and "/dit_attn/" not in frame, (brk.reason, frame)


def _flux_layout_pipeline(kind: str):
    from diffusers import FluxKontextPipeline
    from PIL import Image

    from dit_attn.toy.chroma import build_chroma_pipeline
    from dit_attn.toy.configs import build_flux_pipeline

    if kind == "chroma":
        pipe = build_chroma_pipeline(num_layers=1, num_single_layers=1, num_heads=2, head_dim=8)
    else:
        pipe = build_flux_pipeline(num_layers=1, num_single_layers=1, num_heads=2, head_dim=8)
    extra = {"max_sequence_length": 8}
    if kind == "kontext":
        pipe = FluxKontextPipeline(**{k: v for k, v in pipe.components.items() if k in (
            "transformer", "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")})
        extra.update(image=Image.new("RGB", (32, 32), (30, 160, 40)), max_area=32 * 32, _auto_resize=False)
    pipe.set_progress_bar_config(disable=True)

    def run(height=32, width=32):
        return pipe(prompt="a red circle", num_inference_steps=1, height=height, width=width, output_type="latent",
                    generator=torch.Generator().manual_seed(0), **extra).images
    return pipe, run


@pytest.mark.parametrize("kind", ["flux", "kontext"])
def test_flux_layout_local_attention_compiles_whole_model_fullgraph_through_the_pipeline(kind):
    """Applied to the pipeline, FLUX.1-layout LocalAttention takes the call's grid from the pipeline (Python
    ints) and checks the ids in the graph: the whole transformer compiles with fullgraph=True, gives the
    eager latents, and a second generation does not recompile; another aspect ratio at the same token
    count recompiles and is right (Kontext: the generated grid, its reference tokens global). Chroma, the same
    code path, compiles in `test_local_attention_compiles_fullgraph_on_a_grid_it_does_not_cover`."""
    pipe, run = _flux_layout_pipeline(kind)
    edit = da.LocalAttention(radius=2.0, layers=[1], backend="tiled")
    sizes = [(32, 32), (16, 64)] if kind == "flux" else [(32, 32)]  # 8×8 and 4×16 token grids
    stock = run()
    with torch.no_grad(), da.apply(pipe, edit):
        eager = [run(*size) for size in sizes]
        assert (eager[0] - stock).abs().max() > 1e-4
        torch._dynamo.reset()
        pipe.transformer.compile(fullgraph=True, backend="aot_eager")
        try:
            got = [run()]
            with torch._dynamo.config.patch(error_on_recompile=True):
                again = run()
            with torch._dynamo.config.patch(automatic_dynamic_shapes=False):  # a static recompile: quicker
                got += [run(*size) for size in sizes[1:]]
        finally:
            torch._dynamo.reset()
            pipe.transformer._compiled_call_impl = None
    for out, want in zip(got + [again], eager + eager[:1]):
        assert (out - want).abs().max() < 1e-5


def test_a_direct_call_after_a_pipeline_call_reads_its_own_grid(flux_pipe):
    """Eagerly, a transformer call whose ids are not the grid the pipeline last built uses its ids' grid."""
    transformer = flux_pipe.transformer
    edit = da.LocalAttention(radius=2.0, layers=[1], backend="tiled")
    with CallRecorder(flux_pipe) as rec:
        flux_call(flux_pipe, steps=1, height=16, width=64)
    call = {**rec.calls[0], "return_dict": False}
    with torch.no_grad():
        with da.apply(transformer, edit):
            want = transformer(**call)[0]  # no pipeline: the grid from the ids
        with da.apply(flux_pipe, edit):
            flux_call(flux_pipe, steps=1)  # the pipeline built an 8×8 grid of the same 64 tokens
            got = transformer(**call)[0]
    assert call["img_ids"].shape[0] == 64 and int(call["img_ids"][:, 1].max()) == 3  # 4×16 tokens
    assert (got - want).abs().max() == 0


def steps_with_blocks_compiled(blocks, steps) -> tuple:
    """`steps()` twice with every block compiled with fullgraph=True (diffusers' regional compilation): no graph
    break, and no new graph the second time."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    for block in blocks:
        block.compile(fullgraph=True, backend="aot_eager")
    try:
        compiled = steps()
        graphs = counters["stats"]["unique_graphs"]
        again = steps()
        assert counters["stats"]["unique_graphs"] == graphs
        assert sum(counters["graph_break"].values()) == 0
    finally:
        torch._dynamo.reset()
        for block in blocks:
            block._compiled_call_impl = None
    return compiled, again


def test_text_patch_with_blocks_compiled_fullgraph_equals_eager():
    """TextPatch's source rows (appended at the call, dropped after the last patched layer) through blocks
    compiled with fullgraph=True: no graph break, the eager steps, no new graph on the next generation. The
    source prompt is encoded at the call, outside the blocks."""
    from dit_attn.toy.configs import build_sd3_pipeline

    pipe = build_sd3_pipeline(num_layers=3, num_heads=4, head_dim=8)
    pipe.set_progress_bar_config(disable=True)

    def steps():
        with CallRecorder(pipe) as rec:
            sd3_call(pipe, steps=2)
        return rec.steps

    stock = steps()
    with da.apply(pipe, da.TextPatch(layers=[1], source_prompt="a blue square")):
        eager = steps()
        compiled, again = steps_with_blocks_compiled(pipe.transformer.transformer_blocks, steps)
    assert max((a - b).abs().max() for a, b in zip(eager, stock)) > 1e-4  # the patch changes the steps
    for got in (compiled, again):
        assert max((a - b).abs().max() for a, b in zip(got, eager)) < 1e-5


@pytest.mark.parametrize("family", ["flux", "qwen_image", "flux2", "z_image", "hunyuan_image"])
def test_nag_token_path_with_blocks_compiled_fullgraph_equals_eager(family):
    """NAG's negative text as tokens of each row (FLUX.1: its blocks step by step with the negative modulation;
    Qwen-Image, Z-Image and HunyuanImage: under the padded prompts' key masks; Z-Image and HunyuanImage: the negative
    text joining the stream in the first block) through blocks compiled with fullgraph=True: no graph break, the eager steps, no new graph on
    the next generation."""
    from dit_attn.toy.configs import build_flux_pipeline
    from dit_attn.toy.flux2 import build_flux2_klein_pipeline
    from dit_attn.toy.hunyuan_image import build_hunyuan_image_pipeline
    from dit_attn.toy.qwen_image import build_qwen_image_pipeline
    from dit_attn.toy.z_image import build_z_image_pipeline

    prompts, settings = ["a red circle", "a cat"], dict(max_sequence_length=16)
    if family == "flux":
        pipe = build_flux_pipeline(num_layers=2, num_single_layers=2, num_heads=4, head_dim=8)
    elif family == "qwen_image":
        pipe, settings["true_cfg_scale"] = build_qwen_image_pipeline(num_layers=3, num_heads=4, head_dim=16), 1.0
    elif family == "flux2":
        pipe, settings["guidance_scale"] = build_flux2_klein_pipeline(num_layers=2, num_single_layers=2), 1.0
    elif family == "z_image":  # captions padded to 32 and 64 tokens
        pipe = build_z_image_pipeline(num_layers=3, num_heads=4, head_dim=8)
        prompts, settings = ["a red circle", "a cat " + " ".join(["a dark blue square"] * 8)], dict(guidance_scale=0.0)
    else:  # guidance-distilled, glyph text in one prompt
        pipe = build_hunyuan_image_pipeline(num_layers=2, num_single_layers=2, num_heads=4, head_dim=8,
                                            guidance_embeds=True)
        prompts, settings = ['a red circle "OK"', "a cat"], dict(distilled_guidance_scale=3.25)
    pipe.set_progress_bar_config(disable=True)
    blocks = (list(getattr(pipe.transformer, "transformer_blocks", ())) + list(getattr(pipe.transformer, "layers", ()))
              + list(getattr(pipe.transformer, "single_transformer_blocks", ())))

    def steps():
        with CallRecorder(pipe) as rec:  # a copy of the prompts: Z-Image's pipeline rewrites the list
            pipe(prompt=list(prompts), num_inference_steps=2, height=32, width=32, output_type="latent",
                 generator=torch.Generator().manual_seed(0), **settings)
        return rec.steps

    stock = steps()
    with da.apply(pipe, da.NAG("blue")):
        eager = steps()
        compiled, again = steps_with_blocks_compiled(blocks, steps)
    assert max((a - b).abs().max() for a, b in zip(eager, stock)) > 1e-4  # NAG changes the steps
    for got in (compiled, again):
        assert max((a - b).abs().max() for a, b in zip(got, eager)) < 1e-5


def _many_blocks(family: str):
    """(pipe, first transformer call) of a model with more blocks than dynamo's default recompile_limit (8)."""
    from dit_attn.toy.configs import build_flux_pipeline, build_sd3_pipeline
    from dit_attn.toy.qwen_image import build_qwen_image_pipeline
    from dit_attn.toy.wan import build_wan_pipeline

    build = {"sd3": lambda: build_sd3_pipeline(num_layers=12, num_heads=2, head_dim=8),
             "flux": lambda: build_flux_pipeline(num_layers=3, num_single_layers=9, num_heads=2, head_dim=8),
             "qwen_image": lambda: build_qwen_image_pipeline(num_layers=10),
             "wan": lambda: build_wan_pipeline(num_layers=10)}[family]
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    extra = {"num_frames": 5, "height": 64, "width": 64} if family == "wan" else {}
    with CallRecorder(pipe) as rec:
        pipe("a red circle", num_inference_steps=1, output_type="latent", generator=torch.Generator().manual_seed(0),
             **{"height": 32, "width": 32, "max_sequence_length": 8, **extra})
    return pipe, {**rec.calls[0], "return_dict": False}


def _block_graphs(transformer, call: dict) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Every block compiled with fullgraph=True at the default recompile_limit: (graphs dynamo made for the first
    call, the first call's output, a second call's output under error_on_recompile)."""
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    for block in _blocks(transformer):
        block.compile(fullgraph=True, backend=counting)
    try:
        first = transformer(**call)[0]
        made = len(graphs)
        with torch._dynamo.config.patch(error_on_recompile=True):
            again = transformer(**call)[0]
    finally:
        torch._dynamo.reset()
        for block in _blocks(transformer):
            block._compiled_call_impl = None
    return made, first, again


@pytest.mark.parametrize("family,edit,more", [
    ("sd3", "softpag", 1), ("sd3", "local", 1), ("flux", "softpag", 1), ("flux", "local", 1), ("qwen_image", "softpag", 1),
    ("wan", "local", 1),
    ("sd3", "local everywhere", 0),  # the same window on every layer: one graph per block kind, as stock
    ("sd3", "softpag + local", 2),  # L5's strengths, L3's window (shared with no other layer)
])
def test_regional_compile_shares_the_graph_of_blocks_that_compute_the_same(family, edit, more):
    """Blocks compiled one by one (diffusers' regional compilation): the unedited blocks share the stock blocks'
    graphs and the blocks with only the same window share theirs, so an edit on one layer adds one graph, within
    the default recompile_limit (more blocks than it); the eager output, and no recompile on the next call."""
    pipe, call = _many_blocks(family)
    transformer = pipe.transformer
    layer = 5  # FLUX.1: a single block; none is the last block (whose kind differs on SD3)
    radius = (1.0, 1.0, 1.0) if family == "wan" else 1.0
    edits = {"softpag": (da.SoftPAG([f"L{layer}H0"], u=1.0),),
             "local": (da.LocalAttention(radius=radius, layers=[layer], backend="tiled"),),
             "local everywhere": (da.LocalAttention(radius=radius, backend="tiled"),),
             "softpag + local": (da.SoftPAG([f"L{layer}H0"], u=1.0), da.LocalAttention(radius=radius, layers=[3, layer],
                                                                                         backend="tiled"))}[edit]
    with torch.no_grad():
        stock_graphs, stock, _ = _block_graphs(transformer, call)
        with da.apply(transformer, *edits):
            eager = transformer(**call)[0]
            graphs, got, again = _block_graphs(transformer, call)
    assert (eager - stock).abs().max() > 1e-4  # the edit runs
    assert graphs == stock_graphs + more, (graphs, stock_graphs)
    for out in (got, again):
        assert (out - eager).abs().max() < 1e-5


class StepRecorder:
    """The ε of every scheduler step, from an instance-level `scheduler.step` set before dit-attn is applied
    (outside any compiled region: a forward pre-hook would be traced with the transformer)."""

    def __init__(self, pipe):
        self.steps: list[torch.Tensor] = []
        original = pipe.scheduler.step

        def step(model_output, *args, **kwargs):
            self.steps.append(model_output.clone())
            return original(model_output, *args, **kwargs)

        self.pipe = pipe
        pipe.scheduler.step = step

    def run(self, generate) -> list[torch.Tensor]:
        self.steps = []
        generate()
        return self.steps

    def close(self) -> None:
        del self.pipe.scheduler.step


def _steps_apart(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b)
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def qwen_call(pipe, steps=2):
    """Qwen-Image with true CFG: the call's text mask marks the shorter prompt's padding."""
    return pipe("a red circle", negative_prompt="a blurry photo of a dog", true_cfg_scale=4.0,
                num_inference_steps=steps, height=32, width=32, max_sequence_length=16, output_type="latent",
                generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("family,edit", [("sd3", "guidance"), ("sd3", "text"), ("flux", "guidance"), ("flux", "text"),
                                         ("sd3", "both"), ("qwen_image", "text")])
def test_whole_model_fullgraph_compiles_guided_and_text_patched_calls(family, edit):
    """`torch.compile(transformer, fullgraph=True)` of HeadGuidance's guided calls and TextPatch's patched calls:
    the row planning reads Python ints only and the source prompt is encoded when the pipeline encodes its own
    (before the transformer runs), so the whole call is one graph; the eager steps, and no new graph on the
    next generation."""
    from torch._dynamo.utils import counters

    from dit_attn.toy.configs import build_flux_pipeline, build_sd3_pipeline

    if family == "sd3":
        pipe, run = build_sd3_pipeline(num_layers=3, num_heads=4, head_dim=8), sd3_call
    elif family == "flux":
        pipe, run = build_flux_pipeline(num_layers=2, num_single_layers=2, num_heads=4, head_dim=8), flux_call
    else:
        from dit_attn.toy.qwen_image import build_qwen_image_pipeline

        pipe, run = build_qwen_image_pipeline(num_layers=3), qwen_call
    pipe.set_progress_bar_config(disable=True)
    edits = {"guidance": (da.HeadGuidance(["L1H1", "L2"], scale=2.0, u=0.7),),
             "text": (da.TextPatch(layers=[1], source_prompt="a blue square"),)}
    edits["both"] = edits["guidance"] + edits["text"]
    recorder = StepRecorder(pipe)
    generate = lambda: run(pipe, steps=2)  # noqa: E731
    try:
        stock = recorder.run(generate)
        with da.apply(pipe, *edits[edit]):
            eager = recorder.run(generate)
            torch._dynamo.reset()
            counters.clear()
            pipe.transformer.compile(fullgraph=True, backend="aot_eager")
            try:
                compiled = recorder.run(generate)
                graphs = counters["stats"]["unique_graphs"]
                again = recorder.run(generate)
                assert counters["stats"]["unique_graphs"] == graphs  # the second generation reuses the graphs
            finally:
                torch._dynamo.reset()
                pipe.transformer._compiled_call_impl = None
    finally:
        recorder.close()
    assert _steps_apart(eager, stock) > 1e-4  # the edit changes the steps
    assert _steps_apart(compiled, eager) < 1e-5 and _steps_apart(again, eager) < 1e-5


def test_compiled_guided_blocks_follow_new_strengths_without_apply():
    """Head search sets new strengths on the guided layers between calls (no new apply): blocks compiled with
    fullgraph=True give the eager steps of each strength set (the guided layers' processors read their layer;
    only unedited layers share a graph)."""
    from dit_attn.processors.state import LayerEdit
    from dit_attn.toy.configs import build_sd3_pipeline

    pipe = build_sd3_pipeline(num_layers=3, num_heads=4, head_dim=8)
    pipe.set_progress_bar_config(disable=True)
    recorder = StepRecorder(pipe)
    generate = lambda: sd3_call(pipe, steps=2)  # noqa: E731

    def strengths(state, head: int) -> None:
        edit = state.guided_edits[1]
        u = torch.zeros_like(edit.u)
        u[head] = 1.0
        state.guided_edits[1] = LayerEdit(u, edit.target, edit.scope, (True, False))  # one head of four, as apply marks it

    try:
        with da.apply(pipe, da.HeadGuidance(["L1H1"], scale=2.0, u=1.0)) as handle:
            eager = []
            for head in (1, 3):
                strengths(handle.state, head)
                eager.append(recorder.run(generate))
            torch._dynamo.reset()
            for block in pipe.transformer.transformer_blocks:
                block.compile(fullgraph=True, backend="aot_eager")
            try:
                compiled = []
                for head in (1, 3):
                    strengths(handle.state, head)
                    compiled.append(recorder.run(generate))
            finally:
                torch._dynamo.reset()
                for block in pipe.transformer.transformer_blocks:
                    block._compiled_call_impl = None
    finally:
        recorder.close()
    assert _steps_apart(eager[0], eager[1]) > 1e-4  # the two head sets guide differently
    for got, want in zip(compiled, eager):
        assert _steps_apart(got, want) < 1e-5

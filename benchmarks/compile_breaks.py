"""torch.compile graph breaks of an edited transformer, stock vs dit-attn, side by side.

For each family (config-built, the test shapes scaled to 4 layers) and each edit, runs
`torch._dynamo.explain` on the first transformer call of a pipeline run (edits applied to the
pipeline, which is run once first) and prints the
number of graph breaks and graphs with their most common reasons, then whether
`torch.compile(fullgraph=True)` traces the call. Stock diffusers has none except on
HunyuanVideo 1.5 (a branch on `torch.all(image_embeds == 0)` and per-row masked indexing: the blocks
then run as frames of their own); an edit that
adds one costs a recompile boundary on every call.

Then, for the edits that act in a pipeline's own calls (HeadGuidance, TextPatch), it compiles the whole
transformer with `fullgraph=True` and runs two 2-step generations: whether they trace, the graphs the first
generation made and the second added, and the largest |compiled − eager| of the steps' predictions.

Run:  python benchmarks/compile_breaks.py [--families sd3 flux chroma qwen_image wan hunyuan_video15]
"""
from __future__ import annotations

import argparse
import collections
import inspect
import sys
from pathlib import Path

import torch
import torch._dynamo as dynamo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dit_attn as da  # noqa: E402
from dit_attn.families import family_of  # noqa: E402
from dit_attn.kernels.window import LocalWindow, LocalWindow3D  # noqa: E402
from tests.conftest import CallRecorder  # noqa: E402


def pipeline(family: str):
    if family == "sd3":
        from dit_attn.toy.configs import build_sd3_pipeline
        return build_sd3_pipeline(num_layers=4, num_heads=4, head_dim=8)
    if family == "flux":
        from dit_attn.toy.configs import build_flux_pipeline
        return build_flux_pipeline(num_layers=2, num_single_layers=2, num_heads=4, head_dim=8)
    if family == "chroma":
        from dit_attn.toy.chroma import build_chroma_pipeline
        return build_chroma_pipeline(num_layers=2, num_single_layers=2, num_heads=4, head_dim=8)
    if family == "qwen_image":
        from dit_attn.toy.qwen_image import build_qwen_image_pipeline
        return build_qwen_image_pipeline(num_layers=4)
    if family == "wan":
        from dit_attn.toy.wan import build_wan_pipeline
        return build_wan_pipeline(num_layers=4, num_heads=4, head_dim=12)
    if family == "hunyuan_video15":
        from dit_attn.toy.hunyuan_video15 import build_hunyuan_video15_pipeline
        return build_hunyuan_video15_pipeline(num_layers=4, num_heads=4, head_dim=8)
    raise SystemExit(f"unknown family {family!r}; valid: sd3, flux, chroma, qwen_image, wan, hunyuan_video15")


EDITS = {
    "stock": lambda: (),
    "SoftPAG u=0": lambda: (da.SoftPAG(["L1"], u=0.0),),
    "SoftPAG u=1 (1 head)": lambda: (da.SoftPAG(["L1H0"], u=1.0),),
    "SoftPAG image/uniform": lambda: (da.SoftPAG(["L2"], u=0.5, scope="image", target="uniform"),),
    "LocalAttention r=2": lambda: (da.LocalAttention(radius=2.0, layers=[1]),),  # videos: VIDEO_RADIUS
}
VIDEO_RADIUS = (1.5, 2.0, 2.0)  # video windows are 3-D: (frames, rows, cols)
# pixels per side: every family's token grid is then larger than the window (4×4 … 16×16 images, 2×4×4 and
# 3×8×8 videos), so LocalAttention runs its window path, not the stock attention of a covered grid
SIZE = {"wan": 64}


def edits_for(pipe, name: str, make) -> tuple:
    if family_of(pipe.transformer).makes_videos and name.startswith("LocalAttention"):
        return (da.LocalAttention(radius=VIDEO_RADIUS, layers=[1]),)
    return make()


def generate(pipe, size: int, steps: int = 1) -> None:
    video = {"num_frames": 5} if hasattr(pipe, "vae_scale_factor_temporal") else {}
    if "max_sequence_length" in inspect.signature(pipe.__call__).parameters:
        video["max_sequence_length"] = 8
    with torch.no_grad():
        pipe("a red circle", num_inference_steps=steps, height=size, width=size, output_type="latent",
             generator=torch.Generator().manual_seed(0), **video)


def first_call(pipe, size: int) -> dict:
    with CallRecorder(pipe) as rec:
        generate(pipe, size)
    return {**rec.calls[0], "return_dict": False}


def windows_seen(pipe, size: int) -> list[bool]:
    """covers_grid() of every local window of an eager generation: False means the window path ran."""
    seen = []
    originals = {cls: cls.covers_grid for cls in (LocalWindow, LocalWindow3D)}

    def recording(original):
        def covers_grid(window):
            seen.append(original(window))
            return seen[-1]
        return covers_grid

    try:
        for cls, original in originals.items():
            cls.covers_grid = recording(original)
        generate(pipe, size)
    finally:
        for cls, original in originals.items():
            cls.covers_grid = original
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+",
                        default=["sd3", "flux", "chroma", "qwen_image", "wan", "hunyuan_video15"])
    parser.add_argument("--edits", nargs="+", choices=list(EDITS), default=list(EDITS))
    parser.add_argument("--no-pipeline-edits", dest="pipeline_edits", action="store_false",
                        help="skip the HeadGuidance and TextPatch generations")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, 4-layer config-built models, 32×32 px (Wan 64×64)")
    print(f"{'family':<15} {'edit':<24} {'breaks':>6} {'graphs':>6}  {'fullgraph=True':<16} most common reasons")
    for family in args.families:
        pipe = pipeline(family)
        pipe.set_progress_bar_config(disable=True)
        size = SIZE.get(family, 32)
        call = first_call(pipe, size)
        for name in args.edits:
            edits = edits_for(pipe, name, EDITS[name])
            handle = da.apply(pipe, *edits) if edits else None
            try:
                if any(isinstance(e, da.LocalAttention) for e in edits):
                    # through the pipeline: FLUX.1-layout pipelines give the call's grid before the call
                    seen = windows_seen(pipe, size)
                    if not seen or any(seen):
                        raise SystemExit(f"{family}: LocalAttention did not run its window path "
                                         f"(covers_grid per call: {seen}); make the grid larger than the window")
                dynamo.reset()
                explained = dynamo.explain(pipe.transformer)(**call)
                reasons = collections.Counter(str(b.reason).splitlines()[0][:70] for b in explained.break_reasons)
                fullgraph = fullgraph_result(pipe.transformer, call, reasons)
            finally:
                if handle is not None:
                    handle.remove()
            print(f"{family:<15} {name:<24} {explained.graph_break_count:>6} {explained.graph_count:>6}  {fullgraph:<16} "
                  f"{'; '.join(f'{n}× {r}' for r, n in reasons.most_common(3))}")
        if args.pipeline_edits:
            for name, make in PIPELINE_EDITS.items():
                print(f"{family:<15} {name:<24} whole-model fullgraph, 2 generations: "
                      f"{pipeline_fullgraph(pipe, size, make())}", flush=True)


PIPELINE_EDITS = {
    "HeadGuidance L1H1,L2": lambda: (da.HeadGuidance(["L1H1", "L2"], scale=2.0, u=0.7),),
    "TextPatch L1": lambda: (da.TextPatch(layers=[1], source_prompt="a blue square"),),
}


def pipeline_fullgraph(pipe, size: int, edits: tuple) -> str:
    """Whole-model fullgraph compile of two 2-step generations with `edits` applied to the pipeline."""
    from torch._dynamo.utils import counters

    seen: list[torch.Tensor] = []
    original = pipe.scheduler.step

    def step(model_output, *args, **kwargs):  # outside the compiled region
        seen.append(model_output.clone())
        return original(model_output, *args, **kwargs)

    def steps() -> list[torch.Tensor]:
        seen.clear()
        generate(pipe, size, steps=2)
        return list(seen)

    pipe.scheduler.step = step
    try:
        with da.apply(pipe, *edits):
            eager = steps()
            dynamo.reset()
            counters.clear()
            pipe.transformer.compile(fullgraph=True, backend="eager")
            try:
                first = steps()
                graphs = counters["stats"]["unique_graphs"]
                second = steps()
                added = counters["stats"]["unique_graphs"] - graphs
            except Exception as err:  # dynamo's Unsupported and its wrappers
                return f"fails: {str(err).splitlines()[0][:90]}"
            finally:
                dynamo.reset()
                pipe.transformer._compiled_call_impl = None
    finally:
        del pipe.scheduler.step
    apart = max(float((a - b).abs().max()) for got in (first, second) for a, b in zip(got, eager))
    return f"ok: {graphs} graphs, {added} added by the 2nd generation, max |compiled - eager| {apart:.1e}"


def fullgraph_result(transformer, call: dict, reasons: collections.Counter) -> str:
    """'ok', or 'fails' with the first line of dynamo's refusal added to `reasons`: explain does not
    count a call into a torch.compiler.disable'd function as a break, fullgraph=True refuses it."""
    dynamo.reset()
    try:
        with torch.no_grad():
            torch.compile(transformer, fullgraph=True, backend="eager")(**call)
    except Exception as err:  # dynamo's Unsupported and its wrappers
        reasons[f"fullgraph: {str(err).splitlines()[0][:60]}"] += 1
        return "fails"
    finally:
        dynamo.reset()
    return "ok"

if __name__ == "__main__":
    main()

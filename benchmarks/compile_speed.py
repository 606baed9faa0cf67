"""torch.compile vs eager: seconds per denoising step of stock and edited SD3-format models, side by side.

Every block is compiled with `fullgraph=True` (diffusers' regional compilation, as
`compile_repeated_blocks` does; the inductor backend, this machine's C++ compiler), after the edit is
applied, at dynamo's default `recompile_limit` (the blocks of unedited layers share one graph, and so do the
layers with only the same local window); the graphs the compiled generations made are reported. Each
configuration is warmed up (compiled) by one generation, then timed as the best of
`--repeats` generations of `--steps` steps (latents out, so the VAE is not timed).

Models: the embedded tiny model (7 layers, 64 px) and a 12-layer config-built SD3 (4 heads × 32, 64 px).

Run:  python benchmarks/compile_speed.py [--threads 1] [--steps 4] [--repeats 3] [--models tiny sd3-12]
"""
from __future__ import annotations

import argparse
import contextlib

import torch
import torch._dynamo as dynamo
from torch._dynamo.utils import counters

import dit_attn as da
from dit_attn.loading import call_defaults
from timing import best_of

EDITS = {
    "stock": lambda: (),
    "SoftPAG L2 u=1": lambda: (da.SoftPAG(["L2"], u=1.0),),
    "LocalAttention r=2": lambda: (da.LocalAttention(2),),
    "HeadGuidance L2": lambda: (da.HeadGuidance(["L2"], scale=2.0),),
}


def model(name: str):
    if name == "tiny":
        pipe = da.load_pipeline("tiny")
        run = dict(height=64, width=64, guidance_scale=4.0, **call_defaults(pipe))
    else:
        from dit_attn.toy.configs import build_sd3_pipeline

        pipe = build_sd3_pipeline(num_layers=12, num_heads=4, head_dim=32, sample_size=32)
        run = dict(height=64, width=64, guidance_scale=4.0, max_sequence_length=8)
    pipe.set_progress_bar_config(disable=True)
    return pipe, run


def compile_blocks(transformer) -> None:
    for block in transformer.transformer_blocks:
        block.compile(fullgraph=True)


def uncompile_blocks(transformer) -> None:
    for block in transformer.transformer_blocks:
        block._compiled_call_impl = None


def step_seconds(pipe, run: dict, edits: tuple, steps: int, repeats: int) -> tuple[float, float]:
    """(seconds of the first generation, which compiles the blocks of this configuration; seconds per step after)."""
    def generate():
        pipe("a red circle on a white background", generator=torch.Generator().manual_seed(0),
             num_inference_steps=steps, output_type="latent", **run)

    with da.apply(pipe, *edits) if edits else contextlib.nullcontext():
        first = best_of(generate, 1)
        return first, best_of(generate, repeats) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=["tiny", "sd3-12"], choices=["tiny", "sd3-12"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}, {args.steps} steps, best of {args.repeats}, "
          "CFG on (2 rows a call)")
    print("| model | edit | eager s/step | compiled s/step | compiled / eager | first compiled generation s | graphs |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in args.models:
        pipe, run = model(name)
        for label, edits in EDITS.items():
            _, eager = step_seconds(pipe, run, edits(), args.steps, args.repeats)
            dynamo.reset()
            counters.clear()
            compile_blocks(pipe.transformer)
            warm_up, compiled = step_seconds(pipe, run, edits(), args.steps, args.repeats)
            graphs = counters["stats"]["unique_graphs"]
            uncompile_blocks(pipe.transformer)
            dynamo.reset()
            print(f"| {name} | {label} | {eager:.4f} | {compiled:.4f} | {compiled / eager:.2f}× | {warm_up:.1f} | "
                  f"{graphs} |", flush=True)


if __name__ == "__main__":
    main()

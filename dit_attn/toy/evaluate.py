"""Judge-measured quality and speed of a pipeline on held-out synthetic-world prompts.

`python -m dit_attn.toy.evaluate --model DIR --out report.json --grid grid.png`
reports, for shape prompts, shape+colour adherence (both right) and, for sign prompts,
glyph accuracy, with CFG on and off and optionally with a HeadGuidance setting; plus the
seconds per 64×64 image on one thread at the pipeline's default settings.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from PIL import Image

from .data import make_example, parse_caption
from .judge import adherence, judge

HELD_OUT_SEED = 777_777  # the trainer renders stream seed 0


def held_out_prompts(kind: str, n: int) -> list[str]:
    return [make_example(HELD_OUT_SEED, i, kind).caption for i in range(n)]


def generate(pipe, prompts: list[str], *, seed: int = 0, batch: int = 8, **kwargs) -> list[Image.Image]:
    from ..loading import call_defaults

    kwargs = {**call_defaults(pipe), **kwargs}
    images = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        images += pipe(prompt=chunk, generator=generators, height=64, width=64, **kwargs).images
    return images


def score(images: list[Image.Image], prompts: list[str]) -> dict[str, float]:
    """Shape+colour (shape prompts) or glyph (sign prompts) accuracy, and mean adherence."""
    readings = judge(images)
    hits = []
    for reading, prompt in zip(readings, prompts):
        attrs = parse_caption(prompt)
        if attrs.kind == "sign":
            hits.append(reading["glyph"][0] == attrs.glyph)
        else:
            hits.append(reading["shape"][0] == attrs.shape and reading["color"][0] == attrs.color)
    return {"accuracy": sum(hits) / len(hits), "adherence": float(adherence(images, prompts).mean())}


def seconds_per_image(pipe, prompt: str, repeats: int = 3, **kwargs) -> float:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe(prompt=prompt, height=64, width=64, num_inference_steps=2, **kwargs)  # warm-up
        start = time.perf_counter()
        for i in range(repeats):
            pipe(prompt=prompt, height=64, width=64, generator=torch.Generator().manual_seed(i), **kwargs)
        return (time.perf_counter() - start) / repeats
    finally:
        torch.set_num_threads(threads)


def grid(images: list[Image.Image], cols: int = 8) -> Image.Image:
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    canvas = Image.new("RGB", (cols * w, rows * h), "white")
    for i, image in enumerate(images):
        canvas.paste(image, ((i % cols) * w, (i // cols) * h))
    return canvas


def evaluate(pipe, n: int = 100, guidance=None, cfg_on: float | None = None) -> dict:
    """Scores for shape and sign prompts with the pipeline's default CFG, CFG off, and with `guidance`."""
    import dit_attn as da

    report = {}
    settings = {"default CFG": {} if cfg_on is None else {"guidance_scale": cfg_on}, "CFG off": {"guidance_scale": 1.0}}
    for kind in ("shape", "sign"):
        prompts = held_out_prompts(kind, n)
        for name, kwargs in settings.items():
            report[f"{kind} / {name}"] = score(generate(pipe, prompts, **kwargs), prompts)
        if guidance is not None:
            with da.apply(pipe, guidance):
                report[f"{kind} / default CFG + {guidance}"] = score(generate(pipe, prompts), prompts)
    return report


def main(argv: list[str] | None = None) -> int:
    import dit_attn as da

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--n", type=int, default=100, help="held-out prompts per kind")
    parser.add_argument("--heads", default=None, help="also evaluate HeadGuidance on these heads, e.g. L2")
    parser.add_argument("--pag-scale", type=float, default=2.0)
    parser.add_argument("--out", default=None, help="write the report as JSON here")
    parser.add_argument("--grid", default=None, help="write a PNG grid of samples here")
    args = parser.parse_args(argv)
    pipe = da.load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    guidance = da.HeadGuidance(heads=args.heads.split(","), scale=args.pag_scale) if args.heads else None
    report = evaluate(pipe, args.n, guidance)
    from ..loading import call_defaults

    prompt = held_out_prompts("shape", 1)[0]
    report["seconds per 64x64 image, 1 thread, pipeline defaults"] = seconds_per_image(pipe, prompt)
    if call_defaults(pipe):
        report[f"seconds per 64x64 image, 1 thread, defaults + {call_defaults(pipe)}"] = seconds_per_image(
            pipe, prompt, **call_defaults(pipe))
    print(json.dumps(report, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    if args.grid:
        prompts = held_out_prompts("shape", 16) + held_out_prompts("sign", 16)
        grid(generate(pipe, prompts)).save(args.grid)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Text-layer localization on the tiny model: ranking, editing vs prompt swap, text guard.

1. `localize` over every layer on N sign pairs (judge glyph probability + SSIM): the top
   layer(s) and their share of the transformer's parameters.
2. Editing with the top layer (and the top two, three) vs regenerating with the changed prompt
   (prompt swap), same seeds: judge glyph accuracy of the new character, SSIM to the
   original image, and time per edit / time of one generation. Targets: SSIM clearly above
   prompt swap, ≥ 70% of its glyph accuracy, time ≤ 1.3×.
3. TextGuard on M sign prompts whose character is blocked: how often the judge still reads
   the blocked character, and SSIM to the unguarded image.

Run:  python benchmarks/text_localization.py [--model tiny] [--pairs 20] [--guard 50] [--guard-top 1] [--threads 1] [--out bench-text]
(the LoRA comparison: `dit-attn train-lora --mode localized|all`, then `--lora DIR` here
reports glyph accuracy with each LoRA loaded.)
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

import dit_attn as da
from dit_attn.loading import call_defaults, load_pipeline
from dit_attn.localization import sign_pairs, ssim
from dit_attn.localization.localize import generate
from dit_attn.localization.prompts import quoted_text
from dit_attn.toy.judge import judge


def read_glyphs(images: torch.Tensor) -> list[str | None]:
    return [r["glyph"][0] for r in judge(images)]


def timed(fn):
    began = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - began


def editing(pipe, pairs, layers, seeds, steps, kwargs) -> dict:
    hits_edit = hits_swap = 0
    ssim_edit, ssim_swap, t_gen, t_edit = [], [], 0.0, 0.0
    for pair in pairs:
        original, dt = timed(lambda: generate(pipe, pair.prompt, seeds, steps, **kwargs))
        t_gen += dt
        with da.apply(pipe, da.TextPatch(layers=layers, source_prompt=pair.source_prompt)):
            edited, dt = timed(lambda: generate(pipe, pair.prompt, seeds, steps, **kwargs))
        t_edit += dt
        swapped = generate(pipe, pair.source_prompt, seeds, steps, **kwargs)
        want = quoted_text(pair.source_prompt)
        hits_edit += sum(g == want for g in read_glyphs(edited))
        hits_swap += sum(g == want for g in read_glyphs(swapped))
        ssim_edit += ssim(edited, original).tolist()
        ssim_swap += ssim(swapped, original).tolist()
    n = len(pairs) * len(seeds)
    return {
        "layers": list(layers), "images": n,
        "glyph_accuracy_edit": hits_edit / n, "glyph_accuracy_swap": hits_swap / n,
        "ssim_edit": sum(ssim_edit) / n, "ssim_swap": sum(ssim_swap) / n,
        "time_ratio": t_edit / t_gen,
    }


def top_layers(ranking, n: int) -> tuple[int, ...]:
    return tuple(sorted({layer for score in ranking[:n] for layer in score.layers}))


def guard(pipe, n: int, layers, steps, kwargs, blocked=("X", "K", "Z", "7")) -> dict:
    from dit_attn.toy import data

    prompts = []
    for i in range(n):
        example = data.make_example(123, i, "sign")
        attrs = example.attrs
        glyph = blocked[i % len(blocked)]
        prompts.append(data.caption(data.Attributes("sign", color=attrs.color, background=attrs.background, glyph=glyph)))
    plain = torch.cat([generate(pipe, p, [i], steps, **kwargs) for i, p in enumerate(prompts)])
    with da.apply(pipe, da.TextGuard(blocklist=list(blocked), layers=layers)):
        guarded = torch.cat([generate(pipe, p, [i], steps, **kwargs) for i, p in enumerate(prompts)])
    want = [quoted_text(p) for p in prompts]
    read_plain, read_guarded = read_glyphs(plain), read_glyphs(guarded)
    return {
        "prompts": n, "layers": list(layers),
        "blocked_read_unguarded": sum(a == b for a, b in zip(read_plain, want)) / n,
        "blocked_read_guarded": sum(a == b for a, b in zip(read_guarded, want)) / n,
        "ssim_to_unguarded": float(ssim(guarded, plain).mean()),
    }


def lora_accuracy(pipe, lora_dir: str, pairs, seeds, steps, kwargs) -> dict:
    prompts = [p.source_prompt for p in pairs]

    def accuracy():
        hits = 0
        for prompt in prompts:
            hits += sum(g == quoted_text(prompt) for g in read_glyphs(generate(pipe, prompt, seeds, steps, **kwargs)))
        return hits / (len(prompts) * len(seeds))

    before = accuracy()
    pipe.load_lora_weights(lora_dir)
    try:
        after = accuracy()
        params = sum(p.numel() for n, p in pipe.transformer.named_parameters() if "lora_" in n)
    finally:
        pipe.unload_lora_weights()
    return {"lora": lora_dir, "glyph_accuracy_before": before, "glyph_accuracy_after": after, "lora_parameters": params}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guard", type=int, default=50)
    parser.add_argument("--guard-top", type=int, default=1, help="the guard patches the top N ranked layers")
    parser.add_argument("--lora", action="append", default=[], help="LoRA directories to compare (repeatable)")
    parser.add_argument("--lora-only", action="store_true", help="only the LoRA comparison (no ranking, editing or guard)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench-text")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    kwargs = call_defaults(pipe)
    pairs = sign_pairs(args.pairs)
    held_out = sign_pairs(args.pairs, seed=1)
    report = {"localization": None, "editing": [], "guard": None, "lora": []}
    if args.lora_only:
        compare_loras(pipe, report, held_out, kwargs, args)
        return
    result = da.localize(pipe, pairs, seeds=args.seeds, num_inference_steps=args.steps, out=args.out, **kwargs)
    top = result.ranking
    print(f"threads {args.threads}; ranking: " + ", ".join(f"{s.label} {s.score:.3f}" for s in top))
    print(f"top {top[0].label}: {top[0].text_kv_share:.3%} of parameters in its text K/V, {top[0].block_share:.2%} in its block")
    report["localization"] = result.to_dict()
    for n in (1, 2, 3):  # the top-n ranked layers patched together
        layers = top_layers(top, n)
        row = editing(pipe, held_out, layers, args.seeds, args.steps, kwargs)
        report["editing"].append(row)
        print(f"edit {layers}: glyph acc {row['glyph_accuracy_edit']:.2f} vs swap {row['glyph_accuracy_swap']:.2f}, "
              f"SSIM {row['ssim_edit']:.3f} vs swap {row['ssim_swap']:.3f}, time {row['time_ratio']:.2f}x a generation")
    if args.guard:
        report["guard"] = guard(pipe, args.guard, top_layers(top, args.guard_top), args.steps, kwargs)
        print(f"guard: {report['guard']}")
    compare_loras(pipe, report, held_out, kwargs, args)


def compare_loras(pipe, report: dict, held_out, kwargs, args) -> None:
    for lora in args.lora:
        report["lora"].append(lora_accuracy(pipe, lora, held_out, args.seeds, args.steps, kwargs))
        print(f"lora: {report['lora'][-1]}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "benchmark.json"), "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()

"""IC-LoRA on the tiny model: train on two-panel sets ("same shape, different colours"), then
judge set consistency on held-out captions without and with the LoRA, and measure
reference-conditioned generation (overwrite mode, left panel given): PSNR of the reference
panel to the VAE round trip of the reference, and whether the other panel follows its caption.

Issue 8 targets: training ≤ 20 min on this machine; reference panel PSNR ≥ 30 dB.
Run:  python benchmarks/ic_lora.py [--sets 64] [--steps 1500] [--captions 50] [--threads 2] [--work DIR]
Smoke: python benchmarks/ic_lora.py --sets 8 --steps 10 --captions 4 --references 2 --gen-steps 4
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch

import dit_attn as da
from dit_attn.ic.data import set_captions, write_set_data
from dit_attn.ic.latents import decode, encode, image_tensor
from dit_attn.ic.score import set_consistency, summarize
from dit_attn.train.lora import LoraTrainConfig, train_lora
from dit_attn.toy import data

HELD_OUT_SEED = 1_000_003  # the training sets use seed 0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def round_trip(pipe, image) -> np.ndarray:
    x = decode(pipe, encode(pipe, image_tensor(image, image.height, image.width)))[0]
    return (x.permute(1, 2, 0).cpu().numpy() * 255).round()


def consistency(pipe, captions: list[str], args) -> tuple[dict, float]:
    start, canvases = time.perf_counter(), []
    for i, text in enumerate(captions):
        canvases.append(da.ic.generate_set(pipe, text, "1x2", size=(64, 128), seed=i, num_inference_steps=args.gen_steps,
                                           **({"guidance_scale": args.cfg} if args.cfg is not None else {})).canvas)
    return summarize(set_consistency(canvases, captions)), time.perf_counter() - start


def reference_runs(pipe, n: int, args) -> dict:
    """Left panel given (a held-out rendered set's left panel): PSNR of the generated left panel to the
    reference's VAE round trip (canvas decode and per-panel decode) and the right panel's caption adherence."""
    out = {"psnr_canvas": [], "psnr_panels": [], "right_follows": [], "consistent": []}
    for i in range(n):
        ex = data.make_set_example(HELD_OUT_SEED, 10_000 + i)
        left = da.ic.split(ex.image, "1x2")[0]
        target = round_trip(pipe, left)
        extra = {"guidance_scale": args.cfg} if args.cfg is not None else {}
        for decode_mode in ("canvas", "panels"):
            result = da.ic.generate_set(pipe, ex.caption, "1x2", size=(64, 128), reference={0: left}, seed=i,
                                        num_inference_steps=args.gen_steps, decode=decode_mode, **extra)
            out[f"psnr_{decode_mode}"].append(psnr(np.asarray(result.panels[0]), target))
            if decode_mode == "canvas":
                score = set_consistency([result.canvas], [ex.caption])[0]
                right_ok = score["right"]["shape"] == ex.attrs.shape and score["right"]["color"] == ex.attrs.right_color
                out["right_follows"].append(right_ok)
                out["consistent"].append(score["consistent"])
    return {"psnr_canvas_mean": float(np.mean(out["psnr_canvas"])), "psnr_canvas_min": float(np.min(out["psnr_canvas"])),
            "psnr_panels_mean": float(np.mean(out["psnr_panels"])),
            "right_follows": float(np.mean(out["right_follows"])), "consistent": float(np.mean(out["consistent"]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", type=int, default=64, help="training sets (rendered, seed 0)")
    parser.add_argument("--steps", type=int, default=1500, help="training steps")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--caption-dropout", type=float, default=0.05)
    parser.add_argument("--captions", type=int, default=50, help="held-out captions judged without/with the LoRA")
    parser.add_argument("--references", type=int, default=20, help="reference-conditioned generations")
    parser.add_argument("--gen-steps", type=int, default=20, help="sampling steps")
    parser.add_argument("--cfg", type=float, default=None, help="guidance scale (pipeline default if omitted)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default=None, help="work directory (rerun to resume training); default: a temporary one")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}, sets {args.sets}, steps {args.steps} x batch {args.batch} "
          f"(accumulate {args.accumulate}), rank {args.rank} alpha {args.alpha}, lr {args.lr}, held-out captions "
          f"{args.captions}, reference runs {args.references}, sampling steps {args.gen_steps}, canvas 128x64")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or tmp
        data_dir, lora_dir = os.path.join(work, "data"), os.path.join(work, "lora")
        write_set_data(data_dir, args.sets, seed=0)
        pipe = da.load_pipeline("tiny")
        pipe.set_progress_bar_config(disable=True)
        captions = set_captions(args.captions, HELD_OUT_SEED)
        base, base_s = consistency(pipe, captions, args)
        base_ref = reference_runs(pipe, args.references, args)
        cfg = LoraTrainConfig(mode="ic", rank=args.rank, alpha=args.alpha, steps=args.steps, batch=args.batch, lr=args.lr,
                              warmup=min(50, max(1, args.steps // 10)), caption_dropout=args.caption_dropout,
                              accumulate=args.accumulate, checkpoint_every=max(1, min(100, args.steps)))
        start = time.perf_counter()
        summary = train_lora(pipe, cfg, data_dir, os.path.join(work, "train"), lora_dir)
        train_s = time.perf_counter() - start
        pipe.load_lora_weights(lora_dir)
        lora, lora_s = consistency(pipe, captions, args)
        lora_ref = reference_runs(pipe, args.references, args)
    losses = summary["losses"]
    k = max(1, len(losses) // 10)
    print(f"\ntraining: {train_s / 60:.1f} min this run ({summary['lora_parameters']} LoRA parameters), "
          f"loss first/last tenth {np.mean(losses[:k]):.4f} -> {np.mean(losses[-k:]):.4f}")
    print(f"\n| setting | consistent | same shape | shape right | colours right | s/set | ref PSNR canvas (min) | "
          f"ref PSNR panels | ref: other panel follows caption |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, scores, seconds, ref in (("tiny model", base, base_s, base_ref), ("+ IC-LoRA", lora, lora_s, lora_ref)):
        print(f"| {name} | {scores['consistent']:.0%} | {scores['same_shape']:.0%} | {scores['shape_right']:.0%} | "
              f"{scores['colors_right']:.0%} | {seconds / max(1, args.captions):.2f} | {ref['psnr_canvas_mean']:.1f} "
              f"({ref['psnr_canvas_min']:.1f}) dB | {ref['psnr_panels_mean']:.1f} dB | {ref['right_follows']:.0%} |")
    if args.out:
        result = {"settings": vars(args), "train_seconds": train_s, "losses": losses, "base": base, "lora": lora,
                  "base_reference": base_ref, "lora_reference": lora_ref}
        tmp_out = args.out + ".tmp"
        with open(tmp_out, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp_out, args.out)


if __name__ == "__main__":
    main()

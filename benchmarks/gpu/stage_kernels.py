"""Stage (b): attention kernels at FLUX token counts (1024² and 2048² images: 4096 / 16384 image
tokens + 512 text tokens, 24 heads × 128, bf16), forward and forward + backward, time and
TFLOP/s (dense-equivalent FLOPs: the same figure for every case of a size) against torch SDPA
(flash) and flex_attention:
- forward: SDPA; SoftPAG with 25% of the heads at u = 0.5 and u = 1 in both scopes, Triton vs
  the `sdpa` path; local r ∈ {8, 16, 32}, Triton vs flex_attention;
- forward + backward: SDPA, the Triton dense kernel, local r ∈ {8, 16, 32} Triton vs flex.
Rows are written as they are timed; a size that fails or runs out of time leaves the rows before it."""
from __future__ import annotations

import importlib.util
import os

import torch

import report

SIZES, DRY_SIZES = (1024, 2048), (64, 128)  # dry: 4×4 and 8×8 token grids
RADII, DRY_RADII = (8, 16, 32), (2, 3)


def benchmark_kernels():
    """benchmarks/attention_kernels.py (its FLOP count and FLUX text length)."""
    spec = importlib.util.spec_from_file_location("benchmark_kernels", os.path.join(report.ROOT, "benchmarks", "attention_kernels.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def forward_cases(q, k, v, seq: int, text: int, grid: tuple[int, int], radii, on_gpu: bool) -> dict:
    from dit_attn.kernels import AttentionPlan, LocalWindow, Perturbation, attention

    heads = q.shape[1]
    cases = {"SDPA (plain)": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)}
    for u in (0.5, 1.0):
        quarter = torch.zeros(q.shape[0], heads, device=q.device)
        quarter[:, : max(1, heads // 4)] = u
        for scope in ("joint", "image"):
            plan = AttentionPlan((Perturbation(quarter, "identity", scope),), (text, seq))
            for backend in ("triton", "sdpa"):
                cases[f"{backend} SoftPAG 25% u={u} {scope}"] = lambda plan=plan, b=backend: attention(q, k, v, plan, backend=b)
    for radius in radii:
        plan = AttentionPlan((), (text, seq), LocalWindow(radius, grid))
        for backend in ("triton", "flex"):
            cases[f"{backend} local r={radius}"] = lambda plan=plan, b=backend: attention(q, k, v, plan, backend=b)
    return cases


def training_cases(q, k, v, seq: int, text: int, grid: tuple[int, int], radii, on_gpu: bool) -> dict:
    from dit_attn.kernels import AttentionPlan, LocalWindow, attention
    from dit_attn.kernels.triton.backward import BlockSparseAttention
    from dit_attn.kernels.triton.sparsity import dense_sparsity

    q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
    grad = torch.randn_like(q)
    dense = dense_sparsity(seq, 64 if on_gpu else 32, q.device)
    forwards = {
        "SDPA fwd+bwd": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
        "triton dense fwd+bwd": lambda: BlockSparseAttention.apply(q, k, v, dense, q.shape[-1] ** -0.5)[0],
    }
    for radius in radii:
        plan = AttentionPlan((), (text, seq), LocalWindow(radius, grid))
        backends = ("triton", "flex") if on_gpu else ("triton",)  # flex_attention has no CPU backward
        for backend in backends:
            forwards[f"{backend} local r={radius} fwd+bwd"] = lambda plan=plan, b=backend: attention(q, k, v, plan, backend=b)
    return {name: (lambda forward=forward: forward().backward(grad)) for name, forward in forwards.items()}


def main() -> None:
    args = report.arguments(__doc__.split("\n")[0])
    device = report.device(args.dry_run)
    on_gpu = device == "cuda"
    flux = benchmark_kernels()
    heads, dim, dtype = (24, 128, torch.bfloat16) if on_gpu else (2, 16, torch.float32)
    text = flux.FLUX_TEXT if on_gpu else 16
    sizes, radii = (SIZES, RADII) if on_gpu else (DRY_SIZES, DRY_RADII)
    measure = report.timer(device, repeats=10 if on_gpu else 1, warmup=2 if on_gpu else 0)

    out = report.Report(args.out, "kernels", "Attention kernels", args.dry_run)
    out.note(f"{heads} heads × {dim}, {str(dtype).removeprefix('torch.')}, {text} text tokens, batch 1; mean of "
             f"{10 if on_gpu else 1} calls after warm-up (tuning and compiling happen in the warm-up); "
             f"TFLOP/s = dense attention FLOPs / time (fwd 4·S²·D·H, fwd+bwd 3.5×), so local rows are 'effective'")
    columns = ["image", "tokens", "case", "ms", "TFLOP/s", "vs SDPA"]
    stages = (("forward", forward_cases, 1.0), ("forward + backward", training_cases, 3.5))
    for kind, _, _ in stages:
        out.section(kind, columns)
    for pixels in sizes:
        grid = (pixels // 16, pixels // 16)
        seq = grid[0] * grid[1] + text
        generator = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(1, heads, seq, dim, device=device, dtype=dtype, generator=generator) for _ in range(3))
        work = flux.flops(1, heads, seq, dim)
        for kind, build, factor in stages:
            try:
                cases = build(q, k, v, seq, text, grid, radii, on_gpu)
            except Exception as err:
                out.error(f"{pixels}² {kind} setup", err)
                continue
            base = None
            for name, fn in cases.items():
                try:
                    ms = measure(fn)
                except Exception as err:  # one case failing (a compile error, out of memory) leaves the others
                    out.error(f"{pixels}² {name}", err)
                    continue
                base = base or ms
                row = {"image": f"{pixels}²", "tokens": seq, "case": name, "ms": round(ms, 3),
                       "TFLOP/s": factor * work / ms / 1e9, "vs SDPA": round(ms / base, 3)}
                out.add(kind, row)
                print(f"  {row}", flush=True)
        del q, k, v
        if on_gpu:
            torch.cuda.empty_cache()
    from dit_attn.kernels import selfcheck

    out.note(f"self-check verdicts in this process: {selfcheck.verdicts() or 'none (explicit backends only)'}")


if __name__ == "__main__":
    main()

"""Attention kernels side by side: torch SDPA vs the Triton SoftPAG kernel (and the `sdpa` path).

On CUDA: time and achieved TFLOP/s at FLUX token counts (1024², 2048², 4096² images:
4096 / 16384 / 65536 image tokens + 512 text tokens), 24 heads × 128, bf16:
- forward: plain SDPA (flash), SoftPAG with 25% of heads perturbed at u = 0.5 and u = 1 in
  both scopes (triton vs the `sdpa` path), local windows r ∈ {8, 16, 32} (triton vs
  flex_attention; dense FLOPs are the reference for "effective" TFLOP/s);
- forward + backward: SDPA vs the Triton dense kernel, and local r ∈ {8, 16, 32} triton vs flex.
Targets (to confirm on a GPU): SoftPAG within 5% of plain flash attention; u = 1 heads cost
≈ 0; local r = 16 at 4096² ≥ 10× over dense flash attention.

Everywhere it first prints the local kernel's work bound from its block lists (block
pairs visited vs dense: the ceiling of the local speedup). On a CPU there is no GPU figure
to take: the script says so and runs the Triton interpreter (TRITON_INTERPRET=1) at small sizes for correctness against `reference` only.

    python benchmarks/attention_kernels.py [--sizes 1024 2048] [--repeats 20]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch
from timing import timer

FLUX_TEXT = 512


def flops(batch: int, heads: int, seq: int, dim: int) -> float:
    return 4.0 * batch * heads * seq * seq * dim  # QKᵀ and PV


def gpu_table(sizes: list[int], repeats: int) -> None:
    from dit_attn.kernels import AttentionPlan, LocalWindow, Perturbation, attention

    heads, dim, dtype = 24, 128, torch.bfloat16
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, {heads} heads x {dim}")
    print("| image | tokens | case | ms | TFLOP/s | vs SDPA |\n|---|---:|---|---:|---:|---:|")
    for pixels in sizes:
        seq = (pixels // 16) ** 2 + FLUX_TEXT
        q, k, v = (torch.randn(1, heads, seq, dim, device="cuda", dtype=dtype) for _ in range(3))
        quarter = torch.zeros(1, heads, device="cuda")
        cases = {"SDPA (plain)": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)}
        for u in (0.5, 1.0):
            quarter.zero_()
            quarter[:, : heads // 4] = u
            for scope in ("joint", "image"):
                plan = AttentionPlan((Perturbation(quarter.clone(), "identity", scope),), (FLUX_TEXT, seq))
                cases[f"triton SoftPAG 25% u={u} {scope}"] = lambda plan=plan: attention(q, k, v, plan, backend="triton")
                cases[f"sdpa SoftPAG 25% u={u} {scope}"] = lambda plan=plan: attention(q, k, v, plan, backend="sdpa")
        grid = (pixels // 16, pixels // 16)
        for radius in (8, 16, 32):
            window = AttentionPlan((), (FLUX_TEXT, seq), LocalWindow(radius, grid))
            for backend in ("triton", "flex"):
                cases[f"{backend} local r={radius}"] = lambda plan=window, b=backend: attention(q, k, v, plan, backend=b)
        print_rows(cases, pixels, seq, flops(1, heads, seq, dim), repeats)
        training_table(q, k, v, pixels, seq, grid, repeats)


def print_rows(cases: dict, pixels: int, seq: int, work: float, repeats: int) -> None:
    """One table row per case: time, dense-equivalent TFLOP/s (`work` FLOPs), time relative to the first case."""
    base = None
    for name, fn in cases.items():
        ms = timer("cuda", repeats, warmup=3)(fn)
        base = base or ms
        print(f"| {pixels}² | {seq} | {name} | {ms:.2f} | {work / ms / 1e9:.1f} | {ms / base:.2f} |")


def training_table(q, k, v, pixels: int, seq: int, grid: tuple[int, int], repeats: int) -> None:
    """Forward + backward of the kernels distill-clear trains with (time relative to SDPA's)."""
    from dit_attn.kernels import AttentionPlan, LocalWindow, attention
    from dit_attn.kernels.triton.backward import BlockSparseAttention
    from dit_attn.kernels.triton.sparsity import dense_sparsity

    q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
    grad = torch.randn_like(q)
    dense = dense_sparsity(seq, 64, q.device)
    cases = {
        "SDPA fwd+bwd": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
        "triton dense fwd+bwd": lambda: BlockSparseAttention.apply(q, k, v, dense, q.shape[-1] ** -0.5)[0],
    }
    for radius in (8, 16, 32):
        plan = AttentionPlan((), (FLUX_TEXT, seq), LocalWindow(radius, grid))
        for backend in ("triton", "flex"):
            cases[f"{backend} local r={radius} fwd+bwd"] = lambda plan=plan, b=backend: attention(q, k, v, plan, backend=b)
    steps = {name: (lambda forward=forward: forward().backward(grad)) for name, forward in cases.items()}
    print_rows(steps, pixels, seq, 3.5 * flops(1, q.shape[1], seq, q.shape[-1]), repeats)  # backward ≈ 2.5× forward


def interpreter_check() -> int:
    code = (
        "import torch\n"
        "from dit_attn.kernels import AttentionPlan, Perturbation, attention\n"
        "torch.manual_seed(0)\n"
        "q, k, v = (torch.randn(1, 4, 300, 64) for _ in range(3))\n"
        "u = torch.tensor([[0.0, 0.5, 1.0, 0.25]])\n"
        "for scope in ('joint', 'image'):\n"
        "    for target in ('identity', 'uniform'):\n"
        "        plan = AttentionPlan((Perturbation(u, target, scope),), (44, 300))\n"
        "        err = (attention(q, k, v, plan, backend='triton') - attention(q, k, v, plan, backend='reference')).abs().max()\n"
        "        print(f'{scope:5} {target:8} S=300 D=64: max |triton - reference| = {err:.2e}')\n"
        "from dit_attn.kernels import LocalWindow\n"
        "mixed = (Perturbation(u, 'identity', 'image'), Perturbation(u.flip(1), 'uniform', 'joint'))\n"
        "for window in (None, LocalWindow(4, (16, 16))):\n"
        "    plan = AttentionPlan(mixed, (44, 300), window)\n"
        "    err = (attention(q, k, v, plan, backend='triton') - attention(q, k, v, plan, backend='reference')).abs().max()\n"
        "    print(f'image+joint {\"local r=4\" if window else \"dense\"}: max |triton - reference| = {err:.2e}')\n"
        "plan = AttentionPlan(mixed, (44, 300), LocalWindow(4, (16, 16)))\n"
        "grads = {}\n"
        "for backend in ('triton', 'reference'):\n"
        "    x = [t.clone().requires_grad_(True) for t in (q, k, v)]\n"
        "    attention(*x, plan, backend=backend).square().sum().backward()\n"
        "    grads[backend] = [t.grad for t in x]\n"
        "err = max((a - b).abs().max().item() for a, b in zip(grads['triton'], grads['reference']))\n"
        "print(f'local r=4 16x16 grid, 44 text, image+joint, backward: max |d triton - d reference| = {err:.2e}')\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, "-c", code], env=env).returncode


def block_work_table(sizes: list[int], block: int = 128) -> None:
    """The local kernel's work bound, from its real block lists: (query block, key block) pairs
    it visits vs dense attention's, text rows and columns included. Device-independent: the
    ceiling of the kernel-level speedup over dense flash attention at the same block size."""
    from dit_attn.kernels.blocks import window_blocks

    print(f"Local-window work bound ({block}-token blocks, {FLUX_TEXT} text tokens):")
    print("| image | tokens | r | block pairs visited | of dense | ceiling vs dense |\n|---|---:|---:|---:|---:|---:|")
    for pixels in sizes:
        grid = (pixels // 16, pixels // 16)
        for radius in (8, 16, 32):
            layout = window_blocks(grid, radius, FLUX_TEXT, 0, block)
            visited, dense = int(layout.full.sum() + layout.partial.sum()), layout.full.numel()
            print(f"| {pixels}² | {layout.seq_q} | {radius} | {visited} | {visited / dense:.1%} | {dense / visited:.1f}× |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    block_work_table(args.sizes)
    if torch.cuda.is_available():
        gpu_table(args.sizes, args.repeats)
        return 0
    print("No CUDA GPU here: GPU timings need a GPU. Running the Triton interpreter for correctness only.")
    return interpreter_check()


if __name__ == "__main__":
    raise SystemExit(main())

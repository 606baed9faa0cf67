"""Attention kernels side by side: torch SDPA vs the Triton SoftPAG kernel (and the `sdpa` path).

On CUDA: forward time and achieved TFLOP/s at FLUX token counts (1024², 2048², 4096² images:
4096 / 16384 / 65536 image tokens + 512 text tokens), 24 heads × 128, bf16, for plain
attention, SoftPAG with 25% of heads perturbed at u = 0.5 and at u = 1, in both scopes.
Local windows (CLEAR) and backward passes are not implemented in the kernel yet.

On a CPU there is no GPU figure to take: the script says so and runs the Triton
interpreter (TRITON_INTERPRET=1) at small sizes for correctness against `reference` only.

    python benchmarks/kernels.py [--sizes 1024 2048] [--repeats 20]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch

FLUX_TEXT = 512


def flops(batch: int, heads: int, seq: int, dim: int) -> float:
    return 4.0 * batch * heads * seq * seq * dim  # QKᵀ and PV


def time_cuda(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats  # ms


def gpu_table(sizes: list[int], repeats: int) -> None:
    from dit_attn.kernels import AttentionPlan, Perturbation, attention

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
        base = None
        for name, fn in cases.items():
            ms = time_cuda(fn, repeats)
            base = base or ms
            print(f"| {pixels}² | {seq} | {name} | {ms:.2f} | {flops(1, heads, seq, dim) / ms / 1e9:.1f} | {ms / base:.2f} |")


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
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, "-c", code], env=env).returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if torch.cuda.is_available():
        gpu_table(args.sizes, args.repeats)
        return 0
    print("No CUDA GPU here: GPU timings need a GPU. Running the Triton interpreter for correctness only.")
    return interpreter_check()


if __name__ == "__main__":
    raise SystemExit(main())

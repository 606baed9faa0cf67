"""CLEAR local attention on the CPU: attention-only and one FLUX-shaped block, local vs dense.

Attention-only: q, k, v of shape (1, heads, text + grid², head_dim), fp32, text tokens
first (FLUX order); dense = torch SDPA over every token; local = image queries see
their circle of radius r plus every text token, text queries see everything (exact,
the `reference` definition), computed by dit-attn's `tiled` and `flex` (compiled)
backends. Time is the median of --reps calls after one warm-up call (which also
compiles flex). The ratio is dense time / local time, side by side in one run.

Block: diffusers' FluxSingleTransformerBlock (heads × 128, MLP ratio 4) on the same
tokens with rotary embeddings: stock processor vs dit-attn's processor with the window.
The Amdahl bound is dense block time / (dense block time − dense attention time): the
speed-up if attention cost nothing; the figure to reach is ≥ 80% of it.

Mask construction at 256×256 tokens: cold time and bytes of the tiled geometry and of
the flex BlockMask.

Run:  python benchmarks/local_attention.py [--threads 1 2] [--grids 64 128 256] [--quick]
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from dit_attn.kernels import AttentionPlan, LocalWindow, attention
from dit_attn.kernels.blocks import window_blocks
from dit_attn.kernels.flex import local_block_mask
from dit_attn.kernels.window import default_tile, tile_geometry
from timing import median_time


def reps_for(seconds_hint: float, reps: int) -> int:
    return 1 if seconds_hint > 10 else reps


def attention_table(args) -> None:
    print(f"\n## attention only (fp32, text {args.text} tokens first, heads {args.heads}, median of up to {args.reps})")
    print("threads | grid | head dim | r | dense SDPA s | tiled s | flex s | tiled speed-up | flex speed-up")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for grid in args.grids:
            for dim in args.dims:
                seq = args.text + grid * grid
                g = torch.Generator().manual_seed(0)
                q, k, v = (torch.randn(1, args.heads, seq, dim, generator=g) for _ in range(3))
                start = time.perf_counter()
                F.scaled_dot_product_attention(q, k, v)
                dense = median_time(lambda: F.scaled_dot_product_attention(q, k, v), reps_for(time.perf_counter() - start, args.reps))
                for radius in args.radii:
                    plan = AttentionPlan((), (args.text, seq), LocalWindow(radius, (grid, grid)))
                    row = [str(threads), f"{grid}x{grid}", str(dim), str(radius), f"{dense:.3f}"]
                    results = {}
                    for backend in args.backends:
                        results[backend] = median_time(lambda: attention(q, k, v, plan, backend=backend), args.reps)
                    row += [f"{results[b]:.3f}" if b in results else "-" for b in ("tiled", "flex")]
                    row += [f"{dense / results[b]:.2f}x" if b in results else "-" for b in ("tiled", "flex")]
                    print(" | ".join(row), flush=True)


def flux_block(heads: int, head_dim: int):
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock

    torch.manual_seed(0)
    return FluxSingleTransformerBlock(dim=heads * head_dim, num_attention_heads=heads, attention_head_dim=head_dim, mlp_ratio=4.0).eval()


def rotary(grid: int, text: int, head_dim: int):
    from diffusers.models.embeddings import FluxPosEmbed

    axes = (head_dim // 8, 7 * head_dim // 16, 7 * head_dim // 16)
    ids = torch.zeros(text + grid * grid, 3)
    ids[text:, 1] = torch.arange(grid).repeat_interleave(grid).float()
    ids[text:, 2] = torch.arange(grid).repeat(grid).float()
    return FluxPosEmbed(theta=10000, axes_dim=list(axes))(ids)


def block_table(args) -> None:
    from dit_attn.processors.flux import FluxAttnProcessor
    from dit_attn.processors.state import EditState, LocalSetting

    head_dim = 128
    print(f"\n## one FLUX single block ({args.block_heads} heads x {head_dim}, MLP ratio 4, text {args.text}, fp32)")
    print("threads | grid | r | dense block s | dense attention s | local block s (tiled) | speed-up | Amdahl bound | share of bound")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for grid in args.block_grids:
            block = flux_block(args.block_heads, head_dim)
            stock = block.attn.processor
            seq = args.text + grid * grid
            g = torch.Generator().manual_seed(1)
            image = torch.randn(1, grid * grid, args.block_heads * head_dim, generator=g)
            text = torch.randn(1, args.text, args.block_heads * head_dim, generator=g)
            temb = torch.randn(1, args.block_heads * head_dim, generator=g)
            emb = rotary(grid, args.text, head_dim)
            q, k, v = (torch.randn(1, args.block_heads, seq, head_dim, generator=g) for _ in range(3))
            with torch.no_grad():
                def run_block():
                    return block(hidden_states=image, encoder_hidden_states=text, temb=temb, image_rotary_emb=emb)

                dense_block = median_time(run_block, 1)
                dense_attention = median_time(lambda: F.scaled_dot_product_attention(q, k, v), 1)
                bound = dense_block / max(dense_block - dense_attention, 1e-9)
                for radius in args.radii:
                    state = EditState(local=LocalSetting(float(radius), frozenset({0})), grid=(grid, grid), text_len=args.text)
                    state.local_backend = "tiled"
                    block.attn.set_processor(FluxAttnProcessor(0, state))
                    local_block = median_time(run_block, 1)
                    block.attn.set_processor(stock)
                    speedup = dense_block / local_block
                    print(f"{threads} | {grid}x{grid} | {radius} | {dense_block:.2f} | {dense_attention:.2f} | {local_block:.2f} | "
                          f"{speedup:.2f}x | {bound:.2f}x | {100 * speedup / bound:.0f}%", flush=True)


def mask_table(args) -> None:
    print("\n## mask construction, 256x256 image tokens + 512 text (cold)")
    for radius in args.radii:
        tile_geometry.cache_clear()
        start = time.perf_counter()
        geo = tile_geometry((256, 256), float(radius), default_tile(radius))
        tiled_s = time.perf_counter() - start
        local_block_mask.cache_clear()
        window_blocks.cache_clear()
        start = time.perf_counter()
        mask = local_block_mask((256, 256), float(radius), 512, 0, "cpu")
        order = window_blocks((256, 256), float(radius), 512, 0, 128).order
        flex_s = time.perf_counter() - start
        flex_bytes = sum(t.numel() * t.element_size() for t in (mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks,
                                                                   mask.full_kv_indices, order) if t is not None)
        density = (mask.kv_num_blocks.sum() + mask.full_kv_num_blocks.sum()).item() / (mask.kv_indices.shape[-2] * mask.kv_indices.shape[-1])
        print(f"r={radius}: tiled geometry {tiled_s * 1000:.1f} ms, {geo.nbytes() / 2**20:.2f} MiB; "
              f"flex BlockMask {flex_s * 1000:.1f} ms, {flex_bytes / 2**20:.2f} MiB, {100 * density:.1f}% of blocks computed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--grids", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--block-grids", type=int, nargs="+", default=[128])
    parser.add_argument("--radii", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--block-heads", type=int, default=8)
    parser.add_argument("--text", type=int, default=512)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--backends", nargs="+", default=["tiled", "flex"])
    parser.add_argument("--skip", nargs="*", default=[], choices=["attention", "block", "mask"])
    parser.add_argument("--quick", action="store_true", help="128x128, r=8, head dim 128, 1 thread")
    args = parser.parse_args()
    if args.quick:
        args.threads, args.grids, args.block_grids, args.radii, args.dims = [1], [128], [128], [8], [128]
    print(f"torch {torch.__version__}, threads {args.threads}, cpus {os.cpu_count()}, load {os.getloadavg()[0]:.2f}")
    if "mask" not in args.skip:
        mask_table(args)
    if "attention" not in args.skip:
        attention_table(args)
    if "block" not in args.skip:
        block_table(args)


if __name__ == "__main__":
    main()

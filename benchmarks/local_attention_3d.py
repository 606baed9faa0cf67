"""3-D (video) local attention on the CPU: attention only, the `tiled` backend vs dense torch SDPA.

q, k, v of shape (1, heads, F·H·W, head_dim), fp32, video tokens only (Wan's self-attention); dense =
torch SDPA over every token; local = each query sees the keys in its ellipsoid
(dt/rt)² + (dh/rh)² + (dw/rw)² < 1, borders clipped (exact: the `reference` definition), computed by
dit-attn's `tiled` backend. The window's share is the mean fraction of the tokens a query sees (borders
included); keys/query is the interior ellipsoid; halo/query is what a query of a tile actually computes.
Time is the median of --reps calls after one warm-up call; the ratio is dense time / local time, side
by side in one run.

Run:  python benchmarks/local_attention_3d.py [--threads 1 2] [--grid 13 30 52] [--radii 2,6,10 3,8,12]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from dit_attn.kernels import AttentionPlan, LocalWindow3D, attention
from dit_attn.kernels.window import default_tile_3d, in_ellipsoid, reach, video_tile_geometry
from timing import median_time


def window_share(grid: tuple[int, int, int], radius: tuple[float, float, float]) -> tuple[float, int]:
    """(mean share of the tokens a query sees, keys of an interior query), counted per offset, not per pair."""
    reaches = [min(reach(r), n - 1) for r, n in zip(radius, grid)]
    offsets = torch.cartesian_prod(*[torch.arange(-r, r + 1) for r in reaches])
    inside = in_ellipsoid(offsets[:, 0], offsets[:, 1], offsets[:, 2], radius)
    offsets = offsets[inside]
    pairs = torch.ones(len(offsets), dtype=torch.float64)
    for axis, n in enumerate(grid):
        pairs *= n - offsets[:, axis].abs()
    tokens = grid[0] * grid[1] * grid[2]
    return float(pairs.sum()) / tokens**2, int(inside.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--grid", type=int, nargs=3, default=[13, 30, 52], metavar=("F", "H", "W"))
    parser.add_argument("--radii", nargs="+", default=["2,6,10", "3,8,12", "4,10,14"], help="rt,rh,rw in tokens")
    parser.add_argument("--heads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    grid = tuple(args.grid)
    tokens = grid[0] * grid[1] * grid[2]
    radii = [tuple(float(r) for r in text.split(",")) for text in args.radii]
    print(f"## 3-D local attention (fp32, {grid[0]}×{grid[1]}×{grid[2]} = {tokens} video tokens, head dim {args.dim}, "
          f"batch 1, median of {args.reps}; torch {torch.__version__})")
    print("threads | heads | radius (t, h, w) | window share | keys/query | tile | halo/query | dense SDPA s | tiled s | speed-up")
    print("---|---|---|---|---|---|---|---|---|---")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for heads in args.heads:
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(1, heads, tokens, args.dim, generator=g) for _ in range(3))
            with torch.no_grad():
                dense = median_time(lambda: F.scaled_dot_product_attention(q, k, v), args.reps)
                for radius in radii:
                    window = LocalWindow3D(radius, grid)
                    plan = AttentionPlan((), None, window)
                    share, keys = window_share(grid, window.radius)
                    tile = default_tile_3d(window.radius)
                    geo = video_tile_geometry(grid, window.radius, tile)
                    local = median_time(lambda: attention(q, k, v, plan, backend="tiled"), args.reps)
                    print(f"{threads} | {heads} | {', '.join(f'{r:g}' for r in radius)} | {share:.1%} | {keys} | "
                          f"{'×'.join(map(str, geo.tile))} | {geo.window * len(geo.rows)} | {dense:.3f} | "
                          f"{local:.3f} | {dense / local:.1f}×", flush=True)


if __name__ == "__main__":
    main()

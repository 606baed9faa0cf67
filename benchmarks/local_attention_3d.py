"""3-D (video) local attention: the CPU `tiled` (and optionally `flex`) backends vs dense torch SDPA, ellipsoid
and box windows at about the same token share, and the block-sparse work bound at Wan 2.1 720p.

q, k, v of shape (1, heads, F·H·W, head_dim), fp32, video tokens only (Wan's self-attention); dense =
torch SDPA over every token; local = each query sees the keys in its window, borders clipped (exact: the
`reference` definition): the ellipsoid (dt/rt)² + (dh/rh)² + (dw/rw)² < 1, or the box |dt| < rt, |dh| < rh,
|dw| < rw. Each ellipsoid radius is paired with the box whose interior keys/query are closest to it. The window's
share is the mean fraction of the tokens a query sees (borders included); keys/query is the interior window;
halo/query is what a query of a tile actually computes. Time is the best of --reps calls after one warm-up call
(which compiles flex): the best, not the median, because the CPUs this runs on are shared; the ratio is dense
time / local time, side by side in one run.

The work bound (no timing): the (query block, key block) pairs a block-sparse kernel visits over
[text ; video in 3-D tile order] (`kernels.blocks3d`, the layout flex uses) vs dense attention's — the ceiling
of a block-sparse kernel's speed-up over dense flash attention at the same block size, on any device.

Run:  python benchmarks/local_attention_3d.py [--threads 1 2] [--grid 13 30 52] [--radii 2,6,10 3,8,12] [--flex]
      python benchmarks/local_attention_3d.py --bound-only [--bound-grid 21 45 80]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from dit_attn.kernels import AttentionPlan, LocalWindow3D, attention
from dit_attn.kernels.blocks3d import video_window_blocks
from dit_attn.kernels.window import default_tile_3d, in_window_3d, reach, video_tile_geometry
from timing import best_of


def warm_best_of(fn, reps: int) -> float:
    fn()
    return best_of(fn, reps)


def window_share(grid: tuple[int, int, int], radius: tuple[float, float, float], shape: str) -> tuple[float, int]:
    """(mean share of the tokens a query sees, keys of an interior query), counted per offset, not per pair."""
    reaches = [min(reach(r), n - 1) for r, n in zip(radius, grid)]
    offsets = torch.cartesian_prod(*[torch.arange(-r, r + 1) for r in reaches])
    inside = in_window_3d(offsets[:, 0], offsets[:, 1], offsets[:, 2], radius, shape)
    offsets = offsets[inside]
    pairs = torch.ones(len(offsets), dtype=torch.float64)
    for axis, n in enumerate(grid):
        pairs *= n - offsets[:, axis].abs()
    tokens = grid[0] * grid[1] * grid[2]
    return float(pairs.sum()) / tokens**2, int(inside.sum())


def matching_box(grid: tuple[int, int, int], radius: tuple[float, float, float]) -> tuple[float, float, float]:
    """The box, its half-widths the ellipsoid's reaches scaled alike, whose interior keys/query come closest."""
    _, target = window_share(grid, radius, "ellipsoid")
    best = None
    for step in range(40, 101):
        half = [max(0, round(step / 100 * reach(r))) for r in radius]
        box = tuple(h + 0.5 for h in half)  # |d| < h + 0.5: half-width h
        keys = window_share(grid, box, "box")[1]
        if best is None or abs(keys - target) < abs(best[0] - target):
            best = (keys, box)
    return best[1]


def fmt(radius) -> str:
    return ", ".join(f"{r:g}" for r in radius)


def timing_table(args) -> None:
    grid = tuple(args.grid)
    tokens = grid[0] * grid[1] * grid[2]
    radii = [tuple(float(r) for r in text.split(",")) for text in args.radii]
    backends = ["tiled", "flex"] if args.flex else ["tiled"]
    print(f"## 3-D local attention (fp32, {grid[0]}×{grid[1]}×{grid[2]} = {tokens} video tokens, head dim {args.dim}, "
          f"batch 1, best of {args.reps}; torch {torch.__version__})")
    print("threads | heads | shape | radius (t, h, w) | window share | keys/query | tile | halo/query | dense SDPA s | "
          + " | ".join(f"{b} s | speed-up" for b in backends))
    print("---|" * (9 + 2 * len(backends)))
    for threads in args.threads:
        torch.set_num_threads(threads)
        for heads in args.heads:
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(1, heads, tokens, args.dim, generator=g) for _ in range(3))
            with torch.no_grad():
                dense = warm_best_of(lambda: F.scaled_dot_product_attention(q, k, v), args.reps)
                for ellipsoid in radii:
                    for shape, radius in (("ellipsoid", ellipsoid), ("box", matching_box(grid, ellipsoid))):
                        window = LocalWindow3D(radius, grid, shape)
                        plan = AttentionPlan((), None, window)
                        share, keys = window_share(grid, window.radius, shape)
                        geo = video_tile_geometry(grid, window.radius, default_tile_3d(window.radius), shape)
                        cells = []
                        for backend in backends:
                            local = warm_best_of(lambda: attention(q, k, v, plan, backend=backend), args.reps)
                            cells.append(f"{local:.3f} | {dense / local:.1f}×")
                        print(f"{threads} | {heads} | {shape} | {fmt(radius)} | {share:.1%} | {keys} | "
                              f"{'×'.join(map(str, geo.tile))} | {geo.window * len(geo.rows)} | {dense:.3f} | "
                              + " | ".join(cells), flush=True)


def work_bound_table(args) -> None:
    grid = tuple(args.bound_grid)
    tokens = grid[0] * grid[1] * grid[2]
    radii = [tuple(float(r) for r in text.split(",")) for text in args.bound_radii]
    print(f"## Block-sparse work bound, {grid[0]}×{grid[1]}×{grid[2]} = {tokens} video tokens, {args.text} text tokens "
          f"in the sequence, 3-D tiles of 2×8×8 tokens")
    print("block | shape | radius (t, h, w) | window share | block pairs visited | of dense | of which masked | "
          "ceiling vs dense\n---|---|---|---:|---:|---:|---:|---:")
    for block in args.blocks:
        for ellipsoid in radii:
            for shape, radius in (("ellipsoid", ellipsoid), ("box", matching_box(grid, ellipsoid))):
                layout = video_window_blocks(grid, radius, shape, args.text, block)
                share, _ = window_share(grid, radius, shape)
                visited, dense, masked = layout.visited, layout.full.numel(), int(layout.partial.sum())
                print(f"{block} | {shape} | {fmt(radius)} | {share:.1%} | {visited} | {visited / dense:.1%} | "
                      f"{masked / visited:.0%} | {dense / visited:.1f}×", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--grid", type=int, nargs=3, default=[13, 30, 52], metavar=("F", "H", "W"))
    parser.add_argument("--radii", nargs="+", default=["2,6,10", "3,8,12", "4,10,14"], help="ellipsoid rt,rh,rw in tokens")
    parser.add_argument("--heads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--flex", action="store_true", help="also time the flex backend (compiled on its first call)")
    parser.add_argument("--bound-only", action="store_true", help="print the work bound only (no timing)")
    parser.add_argument("--bound-grid", type=int, nargs=3, default=[21, 45, 80], metavar=("F", "H", "W"),
                        help="default: Wan 2.1 14B at 1280×720, 81 frames (75,600 tokens)")
    parser.add_argument("--bound-radii", nargs="+", default=["3,8,12", "4,12,16", "6,16,24", "8,24,32"])
    parser.add_argument("--blocks", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--text", type=int, default=0, help="text tokens in the sequence (Wan: 0, text is cross-attention)")
    args = parser.parse_args()
    work_bound_table(args)
    if not args.bound_only:
        print()
        timing_table(args)


if __name__ == "__main__":
    main()

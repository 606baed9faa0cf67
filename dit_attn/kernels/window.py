"""CLEAR's local window: which keys each image query may see.

An image query at grid cell (y, x) sees the image keys at (y', x') with
(y − y')² + (x − x')² < r² (border windows clipped, not shifted), every text key, and,
with down-sampling, the pooled image keys; a text query sees every text and image key.

Geometry is built analytically per tile of queries: one circle pattern relative to the
tile's halo (the rectangle of keys its circles can reach) and the in-grid rows/columns
of each halo. That is O(tiles · halo), never O(S²) — only `dense_mask`, the executable
definition the tests compare against, is quadratic.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..checks import check_radius


@dataclass(frozen=True)
class LocalWindow:
    """Local attention for the image tokens of one call.

    grid: (rows, cols) of the image-token grid, row-major in the sequence.
    pool: down-sampling factor of the pooled keys/values every image query also sees
        (None: no pooled keys); pool_weight: (pool, pool) weights that pool each cell
        (CLEAR's `spatial_weight`; 1/pool² everywhere is average pooling).
    """

    radius: float
    grid: tuple[int, int]
    pool: int | None = None
    pool_weight: torch.Tensor | None = None

    def __post_init__(self) -> None:
        check_radius(self.radius)
        rows, cols = self.grid
        if rows < 1 or cols < 1:
            raise ValueError(f"grid must be positive (rows, cols), got {self.grid}")
        if self.pool is not None:
            if rows % self.pool or cols % self.pool:
                raise ValueError(
                    f"down-sampling by {self.pool} needs a token grid divisible by {self.pool}, got {rows}×{cols}"
                )
            if self.pool_weight is None or tuple(self.pool_weight.shape) != (self.pool, self.pool):
                raise ValueError(f"pool_weight must have shape ({self.pool}, {self.pool})")

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def reach(self) -> int:
        """The largest integer offset d with d² < r²."""
        return reach(self.radius)

    def check_tokens(self, image: slice) -> None:
        if image.stop - image.start != self.tokens:
            raise ValueError(
                f"the local window's grid {self.grid[0]}×{self.grid[1]} = {self.tokens} tokens does not match "
                f"the {image.stop - image.start} image tokens of the call"
            )

    def covers_grid(self) -> bool:
        """True when every image key is inside every image query's circle."""
        rows, cols = self.grid
        return self.pool is None and (rows - 1) ** 2 + (cols - 1) ** 2 < self.radius**2


def reach(radius: float) -> int:
    return math.ceil(radius) - 1


def pool_grid(x: torch.Tensor, grid: tuple[int, int], pool: int, weight: torch.Tensor) -> torch.Tensor:
    """(B, H, rows·cols, D) image tokens → (B, H, rows/pool · cols/pool, D) weighted cell sums."""
    rows, cols = grid
    cells = x.unflatten(2, (rows // pool, pool, cols // pool, pool))
    pooled = torch.einsum("bhyixjd,ij->bhyxd", cells, weight.to(x.dtype))
    return pooled.flatten(2, 3)


def dense_mask(seq_len: int, image: slice, window: LocalWindow) -> torch.Tensor:
    """(S, S + pooled) bool: query i may attend key j. The definition; O(S²)."""
    rows, cols = window.grid
    ys = torch.arange(rows).repeat_interleave(cols)
    xs = torch.arange(cols).repeat(rows)
    in_circle = (ys[:, None] - ys[None, :]) ** 2 + (xs[:, None] - xs[None, :]) ** 2 < window.radius**2
    pooled = (rows // window.pool) * (cols // window.pool) if window.pool else 0
    mask = torch.zeros(seq_len, seq_len + pooled, dtype=torch.bool)
    mask[:, :seq_len] = True
    mask[image, image] = in_circle
    mask[image, seq_len:] = True
    return mask


@dataclass(frozen=True)
class TileGeometry:
    """Image queries grouped in tiles of (tile_rows × tile_cols) cells.

    circle: (tile cells, halo cells) bool — query q of a tile may see halo cell k if the
        cell were inside the grid; halo cells are numbered row-major over a
        (tile_rows + 2·reach) × (tile_cols + 2·reach) rectangle centred on the tile.
    halo_rows_inside: (tile rows of the grid, halo rows) bool — halo rows inside the grid.
    halo_cols_inside: (tile cols of the grid, halo cols) bool.
    """

    grid: tuple[int, int]
    radius: float
    tile: tuple[int, int]
    reach: int  # halo margin: the radius's reach, at most the grid's extent
    circle: torch.Tensor
    halo_rows_inside: torch.Tensor
    halo_cols_inside: torch.Tensor

    @property
    def tiles(self) -> tuple[int, int]:
        return self.halo_rows_inside.shape[0], self.halo_cols_inside.shape[0]

    @property
    def halo(self) -> tuple[int, int]:
        return self.halo_rows_inside.shape[1], self.halo_cols_inside.shape[1]

    def allowed(self, tile_row: int) -> torch.Tensor:
        """(tile cols, tile cells, halo cells) bool for the tiles of one tile row."""
        inside = self.halo_rows_inside[tile_row][None, :, None] & self.halo_cols_inside[:, None, :]
        return self.circle[None] & inside.flatten(1)[:, None, :]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.circle, self.halo_rows_inside, self.halo_cols_inside))


def default_tile(radius: float) -> tuple[int, int]:
    """Square tiles near the radius: halo overhead stays moderate and matmuls stay large enough."""
    side = 1 << max(2, min(4, math.ceil(math.log2(max(radius, 1.0)))))
    return side, side


@lru_cache(maxsize=64)
def tile_geometry(grid: tuple[int, int], radius: float, tile: tuple[int, int]) -> TileGeometry:
    """Cached by (grid, radius, tile): a new resolution builds a new entry, never reuses an old one."""
    rows, cols = grid
    tile_rows, tile_cols = tile
    r = min(reach(radius), max(rows, cols) - 1)
    halo_rows, halo_cols = tile_rows + 2 * r, tile_cols + 2 * r
    qy = torch.arange(tile_rows).repeat_interleave(tile_cols)
    qx = torch.arange(tile_cols).repeat(tile_rows)
    ky = torch.arange(halo_rows).repeat_interleave(halo_cols) - r
    kx = torch.arange(halo_cols).repeat(halo_rows) - r
    circle = (qy[:, None] - ky[None, :]) ** 2 + (qx[:, None] - kx[None, :]) ** 2 < radius**2
    n_tile_rows, n_tile_cols = -(-rows // tile_rows), -(-cols // tile_cols)
    halo_y = torch.arange(n_tile_rows)[:, None] * tile_rows - r + torch.arange(halo_rows)[None, :]
    halo_x = torch.arange(n_tile_cols)[:, None] * tile_cols - r + torch.arange(halo_cols)[None, :]
    return TileGeometry(
        grid=grid, radius=radius, tile=tile, reach=r, circle=circle,
        halo_rows_inside=(halo_y >= 0) & (halo_y < rows), halo_cols_inside=(halo_x >= 0) & (halo_x < cols),
    )

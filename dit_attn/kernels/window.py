"""CLEAR's local window: which keys each image query may see.

An image query at grid cell (y, x) sees the image keys at (y', x') with
(y − y')² + (x − x')² < r² (border windows clipped, not shifted), every text key, and,
with down-sampling, the pooled image keys; a text query sees every text and image key.

Geometry is built analytically per tile of queries: one circle pattern relative to the
tile's halo (the rectangle of keys its circles can reach) and the in-grid rows/columns
of each halo. That is O(tiles · halo), never O(S²) — only `dense_mask`, the executable
definition the tests compare against, is quadratic.

Video (`LocalWindow3D`): a query at (t, y, x) of a frame-major (frames, rows, cols) grid
sees the video keys with (dt/rt)² + (dy/ry)² + (dx/rx)² < 1 for radius (rt, ry, rx), border
windows clipped, plus every text key; with shape="box", the keys with |dt| < rt, |dy| < ry and
|dx| < rx (the bounding box of the ellipsoid's integer offsets: the same reach, whole tiles dense). Its tiles are 3-D boxes of queries; a tile's halo is
the set of key offsets some query of the tile can see (`VideoTileGeometry`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..checks import check_radius, check_window_shape


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
    def pooled_tokens(self) -> int:
        return (self.grid[0] // self.pool) * (self.grid[1] // self.pool) if self.pool else 0

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
    if isinstance(window, LocalWindow3D):
        in_circle = window.dense_pattern()
        pooled = 0
    else:
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


def check_video_radius(radius) -> tuple[float, float, float]:
    """A 3-D window's radius (frames, rows, cols) in tokens; ValueError naming what is valid."""
    if not isinstance(radius, (tuple, list)) or len(radius) != 3:
        raise ValueError(f"a video grid (frames × height × width tokens) needs radius=(frames, height, width), "
                         f"a 3-tuple of token radii, e.g. radius=(2, 8, 8); got {radius!r}")
    for r in radius:
        check_radius(r)
    return tuple(float(r) for r in radius)


def in_ellipsoid(dt: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, radius: tuple[float, float, float]) -> torch.Tensor:
    """(dt/rt)² + (dy/ry)² + (dx/rx)² < 1 for integer offsets; every backend uses this one evaluation."""
    rt, ry, rx = radius
    return (dt.double() / rt) ** 2 + (dy.double() / ry) ** 2 + (dx.double() / rx) ** 2 < 1


def in_window_3d(dt: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, radius: tuple[float, float, float],
                 shape: str = "ellipsoid") -> torch.Tensor:
    """The 3-D window's test for integer offsets: the ellipsoid, or the box |dt| < rt, |dy| < ry, |dx| < rx."""
    if shape == "box":
        rt, ry, rx = radius
        return (dt.double().abs() < rt) & (dy.double().abs() < ry) & (dx.double().abs() < rx)
    return in_ellipsoid(dt, dy, dx, radius)


@dataclass(frozen=True)
class LocalWindow3D:
    """Local attention for the video tokens of one call.

    grid: (frames, rows, cols) of the video-token grid, frame-major then row-major in the sequence.
    radius: (rt, ry, rx) in tokens along frames, rows and cols: the ellipsoid a query sees.
    shape: "ellipsoid", or "box" (|dt| < rt, |dy| < ry, |dx| < rx).
    """

    radius: tuple[float, float, float]
    grid: tuple[int, int, int]
    shape: str = "ellipsoid"

    pool = None  # pooled keys are not defined on video grids
    pooled_tokens = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "radius", check_video_radius(self.radius))
        check_window_shape(self.shape)
        if len(self.grid) != 3 or min(self.grid) < 1:
            raise ValueError(f"grid must be positive (frames, rows, cols), got {self.grid}")

    @classmethod
    def for_call(cls, radius, grid: tuple[int, ...], downsample: int | None, shape: str = "ellipsoid") -> "LocalWindow3D":
        """The window of a call whose grid or radius is 3-D; ValueErrors name what is valid."""
        if len(grid) != 3:
            raise ValueError(f"radius={radius!r} is a 3-D (frames, height, width) radius for video grids; this call's "
                             f"image grid is {'×'.join(map(str, grid))} tokens: give a scalar radius")
        if downsample is not None:
            raise ValueError("LocalAttention(downsample=...) (pooled keys) is not implemented on video grids; "
                             "use downsample=None with a 3-tuple radius")
        return cls(radius, tuple(grid), shape)

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    @property
    def reach(self) -> tuple[int, int, int]:
        return tuple(reach(r) for r in self.radius)

    def check_tokens(self, image: slice) -> None:
        if image.stop - image.start != self.tokens:
            raise ValueError(
                f"the local window's grid {'×'.join(map(str, self.grid))} = {self.tokens} tokens does not match "
                f"the {image.stop - image.start} video tokens of the call"
            )

    def covers_grid(self) -> bool:
        """True when every video key is inside every video query's ellipsoid (the far corner is)."""
        # plain floats (the same double arithmetic as `in_window_3d`): no tensor, so no graph break under compile
        if self.shape == "box":
            return all(n - 1 < r for n, r in zip(self.grid, self.radius))
        return sum(((n - 1) / r) ** 2 for n, r in zip(self.grid, self.radius)) < 1

    def positions(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        frames, rows, cols = self.grid
        t = torch.arange(frames).repeat_interleave(rows * cols)
        y = torch.arange(rows).repeat_interleave(cols).repeat(frames)
        x = torch.arange(cols).repeat(frames * rows)
        return t, y, x

    def dense_pattern(self) -> torch.Tensor:
        """(N, N) bool: video query i may see video key j. O(N²): the definition, for `dense_mask`."""
        t, y, x = self.positions()
        return in_window_3d(t[:, None] - t[None, :], y[:, None] - y[None, :], x[:, None] - x[None, :], self.radius,
                            self.shape)


@dataclass(frozen=True)
class VideoTileGeometry:
    """Video queries grouped in tiles of (tile_frames × tile_rows × tile_cols) cells; the tiles with the
    same frames and rows form a band.

    A band gathers its key rows once: the (dt, dy) offsets from the band's first cell that some query
    can see (`rows`), every column of each, stored column-major so that a tile's halo — columns
    x0 − reach … x0 + tile_cols + reach − 1 of every row — is one contiguous window of `window` · rows keys.
    allowed: (tile cells, window · rows) bool, keys in (column, row) order — query q of a tile may see
        the key if it were inside the grid.
    The row offsets and each band's rows are plain Python values (from the grid and radius, never from
    tensor values), so the kernel traces under torch.compile with static shapes and no graph break.
    """

    grid: tuple[int, int, int]
    radius: tuple[float, float, float]
    tile: tuple[int, int, int]
    reach: tuple[int, int, int]  # halo margins: each radius's reach, at most the grid's extent
    rows: tuple[tuple[int, int], ...]  # (dt, dy)
    allowed: torch.Tensor

    @property
    def tiles(self) -> tuple[int, int, int]:
        return tuple(-(-n // t) for n, t in zip(self.grid, self.tile))

    @property
    def padded(self) -> tuple[int, int, int]:
        """The query grid padded to whole tiles."""
        return tuple(n * t for n, t in zip(self.tiles, self.tile))

    @property
    def key_grid(self) -> tuple[int, int, int]:
        """The zero-padded key grid: the query grid's padding plus the reach on both sides."""
        return tuple(p + 2 * r for p, r in zip(self.padded, self.reach))

    @property
    def window(self) -> int:
        return self.tile[2] + 2 * self.reach[2]

    def band_rows(self, frame_tile: int, row_tile: int) -> tuple[list[int], tuple[bool, ...]]:
        """The band's key rows: their indices into the padded key grid's (frame, row) rows, and whether
        each lies inside the grid."""
        index, inside = [], []
        for dt, dy in self.rows:
            t, y = frame_tile * self.tile[0] + dt, row_tile * self.tile[1] + dy
            index.append((t + self.reach[0]) * self.key_grid[1] + y + self.reach[1])
            inside.append(0 <= t < self.grid[0] and 0 <= y < self.grid[1])
        return index, tuple(inside)

    def cols_inside(self) -> torch.Tensor:
        """(col tiles, window) bool: the halo column of each tile lies inside the grid."""
        x = torch.arange(self.tiles[2])[:, None] * self.tile[2] - self.reach[2] + torch.arange(self.window)[None, :]
        return (x >= 0) & (x < self.grid[2])


def default_tile_3d(radius: tuple[float, float, float]) -> tuple[int, int, int]:
    """Small tiles: a tile's halo (its queries' union of ellipsoids) stays close to one ellipsoid."""
    return 1, 4, 8


def _nearest(offset: int, size: int) -> int:
    """The smallest |offset − q| over the tile's queries q = 0 … size − 1."""
    return 0 if 0 <= offset < size else min(abs(offset), abs(offset - size + 1))


@lru_cache(maxsize=64)
def video_tile_geometry(grid: tuple[int, int, int], radius: tuple[float, float, float],
                        tile: tuple[int, int, int], shape: str = "ellipsoid") -> VideoTileGeometry:
    """Cached by (grid, radius, tile, shape): O(tile cells · halo box), independent of the grid's size."""
    reaches = tuple(min(reach(r), n - 1) for r, n in zip(radius, grid))
    tile = tuple(min(t, n) for t, n in zip(tile, grid))
    # a key row is seen if the tile's nearest query sees its nearest column (offset 0): the ellipsoid test
    # on those offsets, with a margin, so rounding can only keep a row that `allowed` then masks
    rt, ry = radius[0], radius[1]
    rows = [(dt, dy) for dt in range(-reaches[0], tile[0] + reaches[0]) for dy in range(-reaches[1], tile[1] + reaches[1])
            if shape == "box" or (_nearest(dt, tile[0]) / rt) ** 2 + (_nearest(dy, tile[1]) / ry) ** 2 < 1 + 1e-9]
    offsets = torch.tensor(rows).view(-1, 2)
    query = torch.cartesian_prod(*[torch.arange(t) for t in tile]).view(-1, 3)
    cols = torch.arange(-reaches[2], tile[2] + reaches[2])
    allowed = in_window_3d(query[:, 0, None, None] - offsets[None, None, :, 0],
                           query[:, 1, None, None] - offsets[None, None, :, 1],
                           query[:, 2, None, None] - cols[None, :, None], radius, shape)  # (cells, cols, rows)
    return VideoTileGeometry(grid=grid, radius=radius, tile=tile, reach=reaches, rows=tuple(rows),
                             allowed=allowed.flatten(1))

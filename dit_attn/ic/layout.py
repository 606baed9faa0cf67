"""Panel layouts (rows × cols), their position tags, and the canvas sizes a model accepts."""
from __future__ import annotations

import re
from dataclasses import dataclass

_NAMED_TAGS = {
    (1, 1): ("IMAGE",),
    (1, 2): ("LEFT", "RIGHT"),
    (2, 1): ("TOP", "BOTTOM"),
    (2, 2): ("TOP-LEFT", "TOP-RIGHT", "BOTTOM-LEFT", "BOTTOM-RIGHT"),
}


@dataclass(frozen=True)
class Layout:
    """A grid of `rows` × `cols` panels filling the canvas exactly (no gutters).

    Panels are numbered row by row: panel k sits at row k // cols, column k % cols.
    """

    rows: int
    cols: int

    def __post_init__(self) -> None:
        for name in ("rows", "cols"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"a layout needs {name} >= 1 (an integer), got {value!r}; e.g. Layout(1, 2) or '1x2'")

    @classmethod
    def parse(cls, value: "Layout | str | tuple[int, int]") -> "Layout":
        """A Layout from a Layout, a (rows, cols) pair or a 'ROWSxCOLS' string such as '1x2' or '2x3'."""
        if isinstance(value, Layout):
            return value
        if isinstance(value, str):
            match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", value)
            if match is None:
                raise ValueError(f"a layout string is ROWSxCOLS with rows, cols >= 1 (e.g. '1x2', '2x2'), got {value!r}")
            return cls(int(match.group(1)), int(match.group(2)))
        if isinstance(value, (tuple, list)) and len(value) == 2:
            return cls(*value)
        raise TypeError(f"layout must be a Layout, a (rows, cols) pair or a 'ROWSxCOLS' string, got {value!r}")

    @property
    def panels(self) -> int:
        return self.rows * self.cols

    def __str__(self) -> str:
        return f"{self.rows}x{self.cols}"

    def position(self, index: int) -> tuple[int, int]:
        """(row, col) of panel `index` (row-major)."""
        if not 0 <= index < self.panels:
            raise ValueError(f"panel index {index} is outside the {self} layout: valid 0-{self.panels - 1}")
        return divmod(index, self.cols)

    def tags(self) -> tuple[str, ...]:
        """Position tags (without brackets), one a panel in row-major order.

        1×1 [IMAGE]; 1×2 [LEFT] [RIGHT]; 2×1 [TOP] [BOTTOM]; 2×2 [TOP-LEFT] [TOP-RIGHT]
        [BOTTOM-LEFT] [BOTTOM-RIGHT]; one row of n > 2 panels [PANEL-1]..[PANEL-n] (left to
        right); one column of n > 2 [PANEL-1]..[PANEL-n] (top to bottom); any other grid
        [ROW-r-COL-c] (1-based).
        """
        if (self.rows, self.cols) in _NAMED_TAGS:
            return _NAMED_TAGS[(self.rows, self.cols)]
        if self.rows == 1 or self.cols == 1:
            return tuple(f"PANEL-{k + 1}" for k in range(self.panels))
        return tuple(f"ROW-{r + 1}-COL-{c + 1}" for r in range(self.rows) for c in range(self.cols))

    def unit(self, align: int = 1) -> tuple[int, int]:
        """The smallest canvas step (height, width) in pixels that splits into whole, `align`-aligned panels."""
        return self.rows * align, self.cols * align

    def check_size(self, height: int, width: int, align: int = 1, what: str = "canvas") -> tuple[int, int]:
        """(panel height, panel width) of a `height` × `width` canvas; ValueError naming the nearest
        valid sizes when the canvas does not split into `align`-pixel aligned panels."""
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{what} {name} must be an integer >= 1, got {value!r}")
        step_h, step_w = self.unit(align)
        if height % step_h or width % step_w:
            why = f"panels aligned to {align} px" if align > 1 else "whole-pixel panels"
            raise ValueError(
                f"a {width}x{height} (WxH) {what} does not split into a {self} grid of {why}: the height must be a "
                f"multiple of {step_h} and the width of {step_w}; nearest valid sizes: "
                f"{', '.join(f'{w}x{h}' for h, w in nearest_sizes(height, width, step_h, step_w))}"
            )
        return height // self.rows, width // self.cols


def _nearest(value: int, step: int) -> list[int]:
    low = max(step, value // step * step)
    high = low if low >= value else low + step
    return sorted({low, high})


def nearest_sizes(height: int, width: int, step_h: int, step_w: int) -> list[tuple[int, int]]:
    """The valid (height, width) sizes around a given size: each side rounded down and up to its step."""
    return [(h, w) for h in _nearest(height, step_h) for w in _nearest(width, step_w)]

"""The synthetic world of the embedded "tiny" model: 64×64 images with exact captions.

Everything is drawn with Pillow and is deterministic from a seed. Three kinds of example:

* **shapes** — ``a {size} {color} {shape} {position} on a {background} background``;
  ``size`` and ``position`` are optional in the caption. An omitted attribute is
  *unspecified* (``None`` in :class:`Attributes`); the renderer then picks one at random
  (from the example's rng), so the image always shows some concrete size and position.
* **signs** — ``a sign that says "{c}" in {color} on a {background} background`` with
  ``c`` in A–Z, 0–9, drawn large, bold (stroked) and centred with the font that ships
  with Pillow (``ImageFont.load_default(size=...)``, Aileron Regular).
* **sets** (for in-context LoRA) — two 64×64 panels side by side (128×64) showing the
  same shape, at the same size and position, in two colours on one background::

      [SET] two panels of the same {shape}; [LEFT] a {color1} {shape} on a {bg} background; [RIGHT] a {color2} {shape} on a {bg} background

Foreground and background colours always differ (and the two colours of a set differ
from each other). Drawing is done at 4× resolution and box-downsampled, so edges are
anti-aliased; the interior of every shape/glyph is the exact palette colour.

Geometry (64×64 pixels): small shapes are 14–18 px across, large ones 28–32 px; a
position puts the shape's centre 14 px (large) or 18 px (small) from the image centre
towards that side, ``center`` at the centre; every centre is jittered by up to ±2 px.
With ``fixed_geometry=True`` every shape of a size is 16 px (small) or 30 px (large)
across and sits exactly at its position: 50 placements of 5 shapes, no jitter.
Glyphs are about 40 px tall with their ink box centred exactly.

Typical use::

    from dit_attn.toy import data
    ex = data.make_example(seed=0, index=7, kind="mix")
    ex.image, ex.caption, ex.attrs, ex.scene      # PIL image, str, caption attrs, drawn attrs
    data.parse_caption(ex.caption) == ex.attrs    # True: the caption is an exact inverse
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator, Literal, Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..checks import check_fraction

__all__ = [
    "PALETTE", "COLORS", "SHAPES", "SIZES", "POSITIONS", "GLYPHS", "KINDS", "VOCABULARY",
    "IMAGE_SIZE", "Attributes", "SetAttributes", "Example", "SetExample",
    "sample_attributes", "resolve", "caption", "parse_caption", "render", "make_example",
    "dataset", "sample_set", "set_caption", "parse_set_caption", "is_set_caption",
    "render_set", "make_set_example", "split_words",
]

IMAGE_SIZE = 64
_SS = 4  # supersampling factor used while drawing

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
GLYPHS: tuple[str, ...] = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
KINDS: tuple[str, ...] = ("shape", "sign")

# Geometry in 64×64 pixels.
_SIZE_RANGE = {"small": (14, 18), "large": (28, 32)}
_POSITION_OFFSET = {"small": 18, "large": 14}
_JITTER = 2
_DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1), "center": (0, 0)}
_FONT_SIZE = 208  # at 4× resolution: ~40 px tall glyphs, the widest (W) ~53 px
_STROKE = 6  # at 4× resolution: thickens strokes by 1.5 px on each side

# Probability that an optional attribute is written in a sampled shape caption.
P_SIZE = 0.5
P_POSITION = 0.5
# Fraction of signs in kind="mix".
SIGN_FRACTION = 0.5


@dataclass(frozen=True)
class Attributes:
    """What a caption says (or, for a rendered scene, what the image shows).

    ``kind`` is ``"shape"`` or ``"sign"``. Attributes that a kind does not have (``glyph``
    for shapes; ``shape``, ``size``, ``position`` for signs) are ``None``, and so are the
    optional ``size`` / ``position`` of a shape caption when the caption omits them.
    """

    kind: str
    shape: Optional[str] = None
    color: Optional[str] = None
    background: Optional[str] = None
    size: Optional[str] = None
    position: Optional[str] = None
    glyph: Optional[str] = None

    def __post_init__(self) -> None:
        _check(self)

    def specified(self) -> dict[str, str]:
        """The attributes that are set (not ``None``), without ``kind``."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "kind" and v is not None}


def _check_value(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _check(a: Attributes) -> None:
    _check_value("kind", a.kind, KINDS)
    _check_value("color", a.color, COLORS)
    _check_value("background", a.background, COLORS)
    if a.color == a.background:
        raise ValueError(f"color and background must differ, both are {a.color!r}")
    if a.kind == "shape":
        _check_value("shape", a.shape, SHAPES)
        if a.size is not None:
            _check_value("size", a.size, SIZES)
        if a.position is not None:
            _check_value("position", a.position, POSITIONS)
        if a.glyph is not None:
            raise ValueError(f"a shape has no glyph, got glyph={a.glyph!r}")
    else:
        _check_value("glyph", a.glyph, GLYPHS)
        for name in ("shape", "size", "position"):
            if getattr(a, name) is not None:
                raise ValueError(f"a sign has no {name}, got {name}={getattr(a, name)!r}")


@dataclass(frozen=True)
class Example:
    """One training example: ``caption`` describes ``attrs`` (with unspecified ``None``);
    ``scene`` is what was drawn (size and position of shapes always filled in)."""

    image: Image.Image
    caption: str
    attrs: Attributes
    scene: Attributes
    seed: int
    index: int


# --------------------------------------------------------------------------- sampling


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


def _pick(rng: np.random.Generator, options, exclude=()) -> str:
    options = [o for o in options if o not in exclude]
    return options[int(rng.integers(len(options)))]


def sample_attributes(
    rng: np.random.Generator,
    kind: Literal["shape", "sign", "mix"] = "shape",
    p_size: float = P_SIZE,
    p_position: float = P_POSITION,
    sign_fraction: float = SIGN_FRACTION,
) -> Attributes:
    """Draw caption attributes uniformly (background uniform among colours ≠ ``color``).

    For shapes, ``size`` / ``position`` are specified with probability ``p_size`` /
    ``p_position`` (else ``None``). ``kind="mix"`` is a sign with probability
    ``sign_fraction``.
    """
    for name, value in (("p_size", p_size), ("p_position", p_position), ("sign_fraction", sign_fraction)):
        check_fraction(name, value)
    if kind == "mix":
        kind = "sign" if rng.random() < sign_fraction else "shape"
    _check_value("kind", kind, KINDS + ("mix",))
    color = _pick(rng, COLORS)
    background = _pick(rng, COLORS, exclude=(color,))
    if kind == "sign":
        return Attributes("sign", color=color, background=background, glyph=_pick(rng, GLYPHS))
    shape = _pick(rng, SHAPES)
    size = _pick(rng, SIZES) if rng.random() < p_size else None
    position = _pick(rng, POSITIONS) if rng.random() < p_position else None
    return Attributes("shape", shape=shape, color=color, background=background, size=size, position=position)


def resolve(attrs: Attributes, rng: Optional[np.random.Generator] = None) -> Attributes:
    """Fill in a shape's unspecified size / position at random (signs are returned as is).

    Without ``rng`` the choice is still deterministic: it is seeded from the caption.
    """
    if attrs.kind != "shape" or (attrs.size is not None and attrs.position is not None):
        return attrs
    rng = rng if rng is not None else _caption_rng(attrs)
    size = attrs.size if attrs.size is not None else _pick(rng, SIZES)
    position = attrs.position if attrs.position is not None else _pick(rng, POSITIONS)
    return dataclasses.replace(attrs, size=size, position=position)


def _caption_rng(attrs: Attributes) -> np.random.Generator:
    return _rng(*caption(attrs).encode())


# --------------------------------------------------------------------------- captions


def caption(attrs: Attributes) -> str:
    """The caption of ``attrs`` (omitted optional attributes are simply left out)."""
    if attrs.kind == "sign":
        return f'a sign that says "{attrs.glyph}" in {attrs.color} on a {attrs.background} background'
    words = ["a"]
    if attrs.size is not None:
        words.append(attrs.size)
    words += [attrs.color, attrs.shape]
    if attrs.position is not None:
        words.append(attrs.position)
    words += ["on", "a", attrs.background, "background"]
    return " ".join(words)


def _alt(options) -> str:
    return "|".join(re.escape(o) for o in options)


_SHAPE_RE = re.compile(
    rf"a (?:(?P<size>{_alt(SIZES)}) )?(?P<color>{_alt(COLORS)}) (?P<shape>{_alt(SHAPES)})"
    rf"(?: (?P<position>{_alt(POSITIONS)}))? on a (?P<background>{_alt(COLORS)}) background"
)
_SIGN_RE = re.compile(
    rf'a sign that says "(?P<glyph>{_alt(GLYPHS)})" in (?P<color>{_alt(COLORS)}) '
    rf"on a (?P<background>{_alt(COLORS)}) background"
)
_GRAMMAR = (
    "'a [small|large] {color} {shape} [left|right|top|bottom|center] on a {color} background' or "
    "'a sign that says \"{A-Z|0-9}\" in {color} on a {color} background', "
    f"color in {list(COLORS)}, shape in {list(SHAPES)}"
)


def parse_caption(text: str) -> Attributes:
    """Exact inverse of :func:`caption`: ``parse_caption(caption(a)) == a``.

    Raises ``ValueError`` (naming the grammar) for any text the grammar cannot produce,
    including captions whose colour equals the background.
    """
    if not isinstance(text, str):
        raise TypeError(f"caption must be a str, got {type(text).__name__}")
    m = _SIGN_RE.fullmatch(text)
    if m:
        kind = "sign"
    else:
        m = _SHAPE_RE.fullmatch(text)
        kind = "shape"
    if m is None:
        raise ValueError(f"caption {text!r} is outside the grammar: expected {_GRAMMAR}")
    try:
        return Attributes(kind, **m.groupdict())
    except ValueError as e:
        raise ValueError(f"caption {text!r}: {e}") from None


# --------------------------------------------------------------------------- rendering


@lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont:
    font = ImageFont.load_default(size=size)
    if not isinstance(font, ImageFont.FreeTypeFont):
        raise RuntimeError("signs need Pillow built with FreeType (ImageFont.load_default(size=...) is a bitmap font here)")
    return font


def _geometry(scene: Attributes, rng: np.random.Generator, fixed: bool = False) -> tuple[float, float, float]:
    """Centre (x, y) and extent of a shape, in 64×64 pixels (fixed: the size's middle extent, no jitter)."""
    lo, hi = _SIZE_RANGE[scene.size]
    dx, dy = _DIRECTIONS[scene.position]
    off = _POSITION_OFFSET[scene.size]
    c = IMAGE_SIZE / 2
    if fixed:
        return c + dx * off, c + dy * off, (lo + hi) / 2
    extent = float(rng.uniform(lo, hi))
    jx, jy = rng.uniform(-_JITTER, _JITTER, size=2)
    return c + dx * off + float(jx), c + dy * off + float(jy), extent


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, extent: float, fill) -> None:
    s = _SS
    cx, cy, r = cx * s, cy * s, extent * s / 2
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        q = r * 0.9  # a full-extent square looks much heavier than the circle
        draw.rectangle([cx - q, cy - q, cx + q, cy + q], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "cross":
        t = r / 3
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    else:  # pragma: no cover - guarded by Attributes
        raise ValueError(f"shape must be one of {list(SHAPES)}, got {shape!r}")


@lru_cache(maxsize=None)
def _glyph_mask(glyph: str) -> Image.Image:
    """Anti-aliased coverage mask (mode "L", 4× size) of a glyph with its *ink* box centred.

    The font's own bounding box includes side bearings, so the ink is measured on a
    probe drawing and the glyph is drawn again shifted by the (integer) difference.
    """
    font = _font(_FONT_SIZE)
    big = IMAGE_SIZE * _SS
    kw = dict(font=font, fill=255, stroke_width=_STROKE, stroke_fill=255)
    probe = Image.new("L", (2 * big, 2 * big), 0)
    ImageDraw.Draw(probe).text((big // 2, big // 2), glyph, **kw)
    x0, y0, x1, y1 = probe.getbbox()
    mask = Image.new("L", (big, big), 0)
    ImageDraw.Draw(mask).text((big // 2 + round(big / 2 - (x0 + x1) / 2), big // 2 + round(big / 2 - (y0 + y1) / 2)),
                              glyph, **kw)
    return mask


def _draw_glyph(img: Image.Image, glyph: str, fill) -> None:
    img.paste(fill, (0, 0), _glyph_mask(glyph))


def _render_scene(scene: Attributes, geometry) -> Image.Image:
    big = IMAGE_SIZE * _SS
    img = Image.new("RGB", (big, big), PALETTE[scene.background])
    if scene.kind == "sign":
        _draw_glyph(img, scene.glyph, PALETTE[scene.color])
    else:
        _draw_shape(ImageDraw.Draw(img), scene.shape, *geometry, PALETTE[scene.color])
    return img.reduce(_SS)


def render(attrs: Attributes, rng: Optional[np.random.Generator] = None, *, return_scene: bool = False,
           fixed_geometry: bool = False):
    """Draw ``attrs`` as a 64×64 RGB image.

    Unspecified size / position and the small geometric jitter are drawn from ``rng``
    (default: an rng seeded from the caption, so ``render(a)`` is a pure function).
    With ``return_scene=True`` returns ``(image, scene)`` where ``scene`` is the fully
    specified :class:`Attributes` actually drawn. ``fixed_geometry``: no jitter, one
    extent per size (the middle of its range).
    """
    rng = rng if rng is not None else _caption_rng(attrs)
    scene = resolve(attrs, rng)
    geometry = _geometry(scene, rng, fixed_geometry) if scene.kind == "shape" else None
    img = _render_scene(scene, geometry)
    return (img, scene) if return_scene else img


_KIND_CODE = {"shape": 1, "sign": 2, "mix": 3}


def make_example(seed: int, index: int, kind: Literal["shape", "sign", "mix"] = "mix", *, fixed_geometry: bool = False,
                 **sample_kwargs) -> Example:
    """Example ``index`` of the stream ``seed``: a pure function of (seed, index, kind).

    ``sample_kwargs`` go to :func:`sample_attributes` (``p_size``, ``p_position``,
    ``sign_fraction``); ``fixed_geometry`` as in :func:`render`.
    """
    if kind not in _KIND_CODE:
        raise ValueError(f"kind must be one of {list(_KIND_CODE)}, got {kind!r}")
    rng = _rng(seed, index, _KIND_CODE[kind])
    attrs = sample_attributes(rng, kind, **sample_kwargs)
    image, scene = render(attrs, rng, return_scene=True, fixed_geometry=fixed_geometry)
    return Example(image, caption(attrs), attrs, scene, seed, index)


def dataset(seed: int, n: Optional[int], kind: Literal["shape", "sign", "mix"] = "mix", start: int = 0,
            **sample_kwargs) -> Iterator[Example]:
    """Examples ``start .. start+n-1`` of the stream ``seed`` (endless if ``n`` is None)."""
    i = start
    while n is None or i < start + n:
        yield make_example(seed, i, kind, **sample_kwargs)
        i += 1


# --------------------------------------------------------------------------- sets


@dataclass(frozen=True)
class SetAttributes:
    """A two-panel set: the same shape in ``left_color`` and ``right_color`` on ``background``."""

    shape: str
    left_color: str
    right_color: str
    background: str

    def __post_init__(self) -> None:
        _check_value("shape", self.shape, SHAPES)
        for name in ("left_color", "right_color", "background"):
            _check_value(name, getattr(self, name), COLORS)
        if len({self.left_color, self.right_color, self.background}) != 3:
            raise ValueError("a set's two colours and its background must all differ, got "
                             f"{self.left_color!r}, {self.right_color!r}, {self.background!r}")

    def panels(self) -> tuple[Attributes, Attributes]:
        """The (left, right) panel attributes."""
        return (Attributes("shape", shape=self.shape, color=self.left_color, background=self.background),
                Attributes("shape", shape=self.shape, color=self.right_color, background=self.background))


@dataclass(frozen=True)
class SetExample:
    image: Image.Image  # 128×64
    caption: str
    attrs: SetAttributes
    scene: tuple[Attributes, Attributes]  # both panels as drawn (same size and position)
    seed: int
    index: int


def sample_set(rng: np.random.Generator) -> SetAttributes:
    """A random set: shape uniform, then three distinct colours (left, right, background)."""
    shape = _pick(rng, SHAPES)
    left = _pick(rng, COLORS)
    right = _pick(rng, COLORS, exclude=(left,))
    background = _pick(rng, COLORS, exclude=(left, right))
    return SetAttributes(shape, left, right, background)


def set_caption(s: SetAttributes) -> str:
    left, right = s.panels()
    return f"[SET] two panels of the same {s.shape}; [LEFT] {caption(left)}; [RIGHT] {caption(right)}"


_SET_RE = re.compile(r"\[SET\] two panels of the same (?P<shape>\w+); \[LEFT\] (?P<left>[^;]+); \[RIGHT\] (?P<right>[^;]+)")


def is_set_caption(text: str) -> bool:
    return isinstance(text, str) and text.startswith("[SET]")


def parse_set_caption(text: str) -> SetAttributes:
    """Exact inverse of :func:`set_caption` (``ValueError`` outside the set grammar)."""
    m = _SET_RE.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f"set caption {text!r} is outside the grammar: expected '[SET] two panels of the same "
                         "{shape}; [LEFT] a {color1} {shape} on a {bg} background; [RIGHT] a {color2} {shape} on a {bg} background'")
    left, right = parse_caption(m["left"]), parse_caption(m["right"])
    ok = (left.kind == right.kind == "shape" and left.shape == right.shape == m["shape"]
          and left.background == right.background and left.size is left.position is None
          and right.size is right.position is None)
    if not ok:
        raise ValueError(f"set caption {text!r}: both panels must be '{{color}} {m['shape']}' with no size/position "
                         "on the same background")
    return SetAttributes(m["shape"], left.color, right.color, left.background)


def render_set(s: SetAttributes, rng: Optional[np.random.Generator] = None, *, return_scene: bool = False):
    """Draw a 128×64 set: both panels share one randomly drawn size, position and jitter."""
    rng = rng if rng is not None else _rng(*set_caption(s).encode())
    left, right = s.panels()
    scene_l = resolve(left, rng)
    geometry = _geometry(scene_l, rng)
    scene_r = dataclasses.replace(scene_l, color=s.right_color)
    canvas = Image.new("RGB", (2 * IMAGE_SIZE, IMAGE_SIZE))
    canvas.paste(_render_scene(scene_l, geometry), (0, 0))
    canvas.paste(_render_scene(scene_r, geometry), (IMAGE_SIZE, 0))
    return (canvas, (scene_l, scene_r)) if return_scene else canvas


def make_set_example(seed: int, index: int) -> SetExample:
    """Set ``index`` of the stream ``seed``: a pure function of (seed, index)."""
    rng = _rng(seed, index, 4)
    s = sample_set(rng)
    image, scene = render_set(s, rng, return_scene=True)
    return SetExample(image, set_caption(s), s, scene, seed, index)


# --------------------------------------------------------------------------- vocabulary

_WORD_RE = re.compile(r'"[^"\s]"|\[[A-Z]+\]|[^\s;]+|;')


def split_words(text: str) -> list[str]:
    """Split a caption into :data:`VOCABULARY` words: whitespace-separated, ``;`` on its
    own, the quoted glyph kept whole (``'"A"'``)."""
    return _WORD_RE.findall(text)


def _vocabulary() -> tuple[str, ...]:
    words: dict[str, None] = {}
    texts = [caption(Attributes("shape", shape=SHAPES[0], color=COLORS[0], background=COLORS[1],
                                size=SIZES[0], position=POSITIONS[0]))]
    texts += [caption(Attributes("sign", color=COLORS[0], background=COLORS[1], glyph=GLYPHS[0]))]
    texts += [set_caption(SetAttributes(SHAPES[0], COLORS[0], COLORS[1], COLORS[2]))]
    for t in texts:
        words.update(dict.fromkeys(split_words(t)))
    for group in (COLORS, SHAPES, SIZES, POSITIONS, [f'"{g}"' for g in GLYPHS]):
        words.update(dict.fromkeys(group))
    return tuple(words)


#: Every word of every caption (shapes, signs, sets), as produced by :func:`split_words`.
#: Glyphs appear with their quotes (``'"A"'``, ``'"7"'``). Note that a lower-casing
#: tokenizer (CLIP's) maps the glyph ``"A"`` to ``"a"``: keep the quotes as tokens.
VOCABULARY: tuple[str, ...] = _vocabulary()

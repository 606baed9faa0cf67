"""The synthetic world: determinism, caption grammar, drawing invariants."""

import numpy as np
import pytest
import torch

from dit_attn.toy import data
from dit_attn.toy.data import PALETTE, Attributes

torch.set_num_threads(1)


def _mask(img, background):
    """Pixels that differ from the background colour (H, W) bool."""
    a = np.asarray(img).astype(int)
    return np.abs(a - np.array(PALETTE[background])).sum(-1) > 30


def test_same_seed_same_bytes_different_seed_differs():
    for kind in ("shape", "sign", "mix"):
        for i in range(10):
            a, b = data.make_example(3, i, kind), data.make_example(3, i, kind)
            assert a.image.tobytes() == b.image.tobytes() and a.caption == b.caption and a.scene == b.scene
    other = [data.make_example(4, i).image.tobytes() != data.make_example(3, i).image.tobytes() for i in range(20)]
    assert sum(other) >= 18
    s1, s2 = data.make_set_example(0, 5), data.make_set_example(0, 5)
    assert s1.image.tobytes() == s2.image.tobytes() and s1.caption == s2.caption
    assert data.make_set_example(1, 5).image.tobytes() != s1.image.tobytes()
    # render without an rng is a pure function of the attributes
    a = data.make_example(0, 1, "shape").attrs
    assert data.render(a).tobytes() == data.render(a).tobytes()
    assert [e.caption for e in data.dataset(2, 5, start=3)] == [data.make_example(2, i).caption for i in range(3, 8)]


def test_caption_attributes_round_trip():
    seen_optional = set()
    for i in range(1500):
        ex = data.make_example(11, i, "mix")
        assert data.parse_caption(ex.caption) == ex.attrs
        assert data.caption(ex.attrs) == ex.caption
        assert data.caption(data.parse_caption(ex.caption)) == ex.caption
        # the scene agrees with every specified attribute and fills in the rest
        for k, v in ex.attrs.specified().items():
            assert getattr(ex.scene, k) == v
        if ex.attrs.kind == "shape":
            assert ex.scene.size in data.SIZES and ex.scene.position in data.POSITIONS
            seen_optional.add((ex.attrs.size is None, ex.attrs.position is None))
        else:
            assert ex.scene == ex.attrs and ex.attrs.glyph in data.GLYPHS
        assert set(data.split_words(ex.caption)) <= set(data.VOCABULARY)
    assert len(seen_optional) == 4  # every combination of omitted size / position occurs
    for i in range(200):
        s = data.make_set_example(11, i)
        assert data.parse_set_caption(s.caption) == s.attrs and data.set_caption(s.attrs) == s.caption
        assert set(data.split_words(s.caption)) <= set(data.VOCABULARY)


def test_caption_examples_and_grammar_errors():
    a = data.parse_caption("a small red circle left on a white background")
    assert a == Attributes("shape", shape="circle", color="red", background="white", size="small", position="left")
    assert data.parse_caption("a blue cross on a black background").size is None
    assert data.parse_caption('a sign that says "Q" in green on a yellow background').glyph == "Q"
    assert '"Q"' in data.VOCABULARY and "[SET]" in data.VOCABULARY
    for bad in ["a red circle on a red background", "a pink circle on a white background",
                "a red circle", "a large red circle small on a white background", "a red hexagon on a blue background",
                'a sign that says "q" in red on a blue background', 'a sign that says "AB" in red on a blue background',
                "data.caption", "[SET] two panels of the same circle; [LEFT] a red circle on a blue background; "
                "[RIGHT] a green circle on a blue background"]:
        with pytest.raises(ValueError, match="grammar|differ"):
            data.parse_caption(bad)
    with pytest.raises(TypeError):
        data.parse_caption(None)
    with pytest.raises(ValueError, match="differ"):
        Attributes("shape", shape="circle", color="red", background="red")
    with pytest.raises(ValueError, match="no glyph"):
        Attributes("shape", shape="circle", color="red", background="blue", glyph="A")


def test_sign_fraction_sets_the_mix_and_probabilities_are_checked():
    def signs(fraction):
        return sum(data.make_example(3, i, "mix", sign_fraction=fraction).attrs.kind == "sign" for i in range(400))
    assert signs(0.0) == 0 and signs(1.0) == 400
    assert 90 <= signs(0.3) <= 150 and 170 <= signs(0.5) <= 230
    for name, bad in [("sign_fraction", 1.5), ("p_size", -0.1), ("p_position", "half"), ("sign_fraction", True),
                      ("p_size", float("nan"))]:
        with pytest.raises(ValueError, match=f"{name} must be a number in \\[0, 1\\]"):
            data.make_example(3, 0, "mix", **{name: bad})


def test_palette_and_background_differ():
    for i in range(300):
        ex = data.make_example(5, i, "mix")
        assert ex.attrs.color != ex.attrs.background
        a = np.asarray(ex.image)
        assert ex.image.size == (64, 64) and ex.image.mode == "RGB"
        assert tuple(a[0, 0]) == PALETTE[ex.attrs.background] or tuple(a[63, 63]) == PALETTE[ex.attrs.background]
        # interior pixels carry the exact palette colour of the shape / glyph
        assert (a == np.array(PALETTE[ex.attrs.color])).all(-1).sum() >= 20


def test_size_and_position_are_visible():
    for i in range(300):
        ex = data.make_example(6, i, "shape")
        m = _mask(ex.image, ex.scene.background)
        ys, xs = np.nonzero(m)
        extent = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1
        if ex.scene.size == "small":
            assert 12 <= extent <= 20
        else:
            assert 26 <= extent <= 34
        cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
        side = {"left": cx < 24, "right": cx > 40, "top": cy < 24, "bottom": cy > 40,
                "center": abs(cx - 32) < 4 and abs(cy - 32) < 4}
        assert side[ex.scene.position], (ex.caption, cx, cy)


def test_fixed_geometry_draws_one_image_per_placement():
    fixed, varied = {}, {}
    for i in range(400):
        ex, ex_varied = data.make_example(6, i, "shape", fixed_geometry=True), data.make_example(6, i, "shape")
        assert (ex.caption, ex.scene) == (ex_varied.caption, ex_varied.scene)  # only the drawing changes
        s = ex.scene
        key = (s.shape, s.size, s.position, s.color, s.background)
        fixed.setdefault(key, set()).add(ex.image.tobytes())
        varied.setdefault(key, set()).add(ex_varied.image.tobytes())
        ys, xs = np.nonzero(_mask(ex.image, s.background))
        cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
        dx, dy = {"left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1), "center": (0, 0)}[s.position]
        offset = 18 if s.size == "small" else 14
        assert abs(cx - (32 + dx * offset)) <= 1 and abs(cy - (32 + dy * offset)) <= 1, (ex.caption, cx, cy)
    assert all(len(images) == 1 for images in fixed.values())
    assert any(len(images) > 1 for images in varied.values())  # the default drawing jitters


def test_glyphs_are_large_and_centred():
    for g in data.GLYPHS:
        img = data.render(Attributes("sign", color="black", background="white", glyph=g))
        ys, xs = np.nonzero(_mask(img, "white"))
        cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
        assert abs(cx - 32) <= 1 and abs(cy - 32) <= 1, (g, cx, cy)
        assert 36 <= ys.max() - ys.min() + 1 <= 50, g
        assert xs.min() >= 2 and xs.max() <= 61, g
    # every glyph image is distinct
    imgs = {data.render(Attributes("sign", color="red", background="blue", glyph=g)).tobytes() for g in data.GLYPHS}
    assert len(imgs) == len(data.GLYPHS)


def test_set_canvas():
    for i in range(20):
        s = data.make_set_example(2, i)
        assert s.image.size == (128, 64)
        assert len({s.attrs.left_color, s.attrs.right_color, s.attrs.background}) == 3
        left, right = s.image.crop((0, 0, 64, 64)), s.image.crop((64, 0, 128, 64))
        # the same shape at the same place: identical silhouettes, different colours
        inside_l = (np.asarray(left) == np.array(PALETTE[s.attrs.left_color])).all(-1)
        inside_r = (np.asarray(right) == np.array(PALETTE[s.attrs.right_color])).all(-1)
        assert inside_l.sum() >= 20 and (inside_l == inside_r).all()
        assert s.scene[0].shape == s.scene[1].shape == s.attrs.shape
        assert s.scene[0].color == s.attrs.left_color and s.scene[1].color == s.attrs.right_color
    assert data.render_set(s.attrs).size == (128, 64)
    assert s.caption.startswith("[SET] two panels of the same ")
    with pytest.raises(ValueError, match="differ"):
        data.SetAttributes("circle", "red", "red", "blue")

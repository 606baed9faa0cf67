"""The shipped judge: accuracy on fresh images, adherence, input handling."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from dit_attn.toy import data
from dit_attn.toy.judge import (CLASSES, HEADS, WEIGHTS_PATH, _load, adherence, evaluate_judge, judge,
                                   load_judge, probabilities, train_judge)

torch.set_num_threads(1)

FRESH_SEED = 424242  # the judge was trained on stream 0


def test_weights_are_shipped_and_small():
    assert WEIGHTS_PATH.exists()
    assert WEIGHTS_PATH.stat().st_size < 2_000_000
    assert load_judge() is load_judge()  # cached
    with safe_open(str(WEIGHTS_PATH), "pt") as f:
        meta = json.loads(f.metadata()["dit_attn.judge"])
    assert meta["info"] == {"seed": 0, "steps": 2000, "batch_size": 64, "lr": 0.003}  # `--out PATH` defaults


@pytest.mark.parametrize("augmented", [False, True])
def test_shipped_judge_accuracy_on_fresh_samples(augmented):
    acc = evaluate_judge(seed=FRESH_SEED, n=300, augmented=augmented)
    low = {k: v for k, v in acc.items() if v < 0.95}
    assert not low, acc


def test_judge_output_format_and_inputs():
    exs = [data.make_example(FRESH_SEED, i, "mix") for i in range(16)]
    out = judge([e.image for e in exs])
    assert len(out) == 16 and all(set(o) == set(HEADS) for o in out)
    for o, e in zip(out, exs):
        for h, (label, p) in o.items():
            assert label in CLASSES[h] and 0 <= p <= 1
        assert o["glyph"][0] == e.scene.glyph and o["shape"][0] == e.scene.shape  # None where it does not apply
    single = judge(exs[0].image)
    assert len(single) == 1 and single[0]["color"][0] == out[0]["color"][0]
    # a tensor in [-1, 1], a uint8 tensor and a 128×128 upscale read the same
    x = torch.from_numpy(np.stack([np.asarray(e.image) for e in exs])).permute(0, 3, 1, 2)
    labels = [{h: o[h][0] for h in HEADS} for o in out]
    assert [{h: o[h][0] for h in HEADS} for o in judge(x.float() / 127.5 - 1, value_range=(-1, 1))] == labels
    assert [{h: o[h][0] for h in HEADS} for o in judge(x)] == labels
    big = [e.image.resize((128, 128), Image.BICUBIC) for e in exs]
    agree = sum(o[h][0] == l[h] for o, l in zip(judge(big), labels) for h in HEADS)
    assert agree >= 0.95 * 16 * len(HEADS)
    with pytest.raises(ValueError, match="square"):
        judge(torch.rand(1, 3, 64, 128))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        judge(torch.rand(2, 64, 64))
    with pytest.raises(TypeError):
        judge(["not an image"])


def test_adherence_own_caption_is_one_and_mismatch_is_low():
    exs = [data.make_example(FRESH_SEED + 1, i, "mix") for i in range(48)]
    images = [e.image for e in exs]
    own = adherence(images, [e.caption for e in exs])
    assert own.shape == (48,) and own.dtype == torch.float32
    assert torch.all(own == 1.0), [e.caption for e, s in zip(exs, own) if s < 1]
    shifted = adherence(images, [exs[(i + 7) % 48].caption for i in range(48)])
    assert shifted.mean() < 0.3 and shifted.max() < 1.0
    # one wrong attribute out of three → 2/3
    e = next(e for e in exs if e.attrs.kind == "shape" and e.attrs.size is None and e.attrs.position is None)
    other = next(c for c in data.COLORS if c not in (e.attrs.color, e.attrs.background))
    wrong = data.caption(data.Attributes("shape", shape=e.attrs.shape, color=other, background=e.attrs.background))
    assert adherence(e.image, wrong).item() == pytest.approx(2 / 3)
    # a sign prompt on a shape image: only the colours can match
    sign = data.caption(data.Attributes("sign", color=e.attrs.color, background=e.attrs.background, glyph="A"))
    assert adherence(e.image, sign).item() == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="prompts"):
        adherence(images[:2], ["a red circle on a blue background"] * 3)
    with pytest.raises(ValueError, match="grammar"):
        adherence(images[0], "a photo of a cat")


def test_soft_adherence_is_the_mean_probability_of_the_wanted_classes():
    exs = [data.make_example(FRESH_SEED + 2, i, "mix") for i in range(16)]
    images, captions = [e.image for e in exs], [e.caption for e in exs]
    probs = probabilities(images)
    expected = []
    for i, caption in enumerate(captions):  # independent of adherence(): straight from the probability table
        want = data.parse_caption(caption).specified()
        expected.append(sum(float(probs[h][i, CLASSES[h].index(v)]) for h, v in want.items()) / len(want))
    soft = adherence(images, captions, soft=True)
    assert soft.tolist() == pytest.approx(expected, abs=1e-6)
    assert torch.all(soft > 0.9) and torch.all(soft <= 1.0)
    # a blurred image lowers the soft score continuously while the verdicts may stay the same
    blurred = [e.image.resize((16, 16)).resize((64, 64)) for e in exs]
    assert adherence(blurred, captions, soft=True).mean() < soft.mean()


def test_adherence_on_sets():
    sets = [data.make_set_example(FRESH_SEED, i) for i in range(8)]
    assert torch.all(adherence([s.image for s in sets], [s.caption for s in sets]) == 1.0)
    swapped = data.set_caption(data.SetAttributes(sets[0].attrs.shape, sets[0].attrs.right_color,
                                                  sets[0].attrs.left_color, sets[0].attrs.background))
    assert adherence(sets[0].image, swapped).item() == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="2-panel"):
        adherence(sets[0].image.crop((0, 0, 64, 64)), sets[0].caption)


def test_training_is_deterministic(tmp_path):
    a = train_judge(seed=3, steps=2, out_path=tmp_path / "a.safetensors", batch_size=8, progress=False)
    b = train_judge(seed=3, steps=2, batch_size=8, progress=False)
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k
    c = _load(tmp_path / "a.safetensors")
    x = torch.rand(2, 3, 64, 64)
    assert all(torch.allclose(a(x)[h], c(x)[h]) for h in HEADS)

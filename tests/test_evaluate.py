from dit_attn.toy.data import make_example
from dit_attn.toy.evaluate import HELD_OUT_SEED, grid, held_out_prompts, score


def test_score_is_perfect_on_renders_and_low_on_shuffled_pairs():
    examples = [make_example(HELD_OUT_SEED, i, kind) for kind in ("shape", "sign") for i in range(12)]
    images, prompts = [e.image for e in examples], [e.caption for e in examples]
    assert prompts[:12] == held_out_prompts("shape", 12)
    assert score(images, prompts)["accuracy"] == 1.0
    shuffled = score(images[1:] + images[:1], prompts)
    assert shuffled["accuracy"] < 0.5 and shuffled["adherence"] < 0.8
    assert grid(images, cols=6).size == (6 * 64, 4 * 64)

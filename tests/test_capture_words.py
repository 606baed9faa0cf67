"""Capture's word lookup on the families that wrap the prompt in a template: the looked-up text-token
indices are those the family's own tokenizer gives the word inside the text the pipeline encodes
(tokenized here from the templates in diffusers' pipelines), and a word's map is the sum of its tokens' maps."""
import pytest
import torch

import dit_attn as da
from dit_attn.capture.words import word_positions
from dit_attn.toy.flux2 import build_flux2_klein_pipeline, build_flux2_pipeline
from dit_attn.toy.hunyuan_image import build_hunyuan_image_pipeline
from dit_attn.toy.qwen_image import build_qwen_image_pipeline
from dit_attn.toy.z_image import build_z_image_pipeline

torch.set_num_threads(1)

PROMPT = "a red circle beside a blue square"
QWEN_SYSTEM = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
               "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>")
QWEN_TEMPLATE = QWEN_SYSTEM + "\n<|im_start|>assistant\n"  # QwenImagePipeline; HunyuanImage ends at <|im_end|>
QWEN_DROP = 34
CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"  # the toy tokenizers' chat template

FAMILIES = {  # builder, family name, call arguments
    "qwen_image": (build_qwen_image_pipeline, dict(true_cfg_scale=1.0, max_sequence_length=16)),
    "z_image": (build_z_image_pipeline, dict(guidance_scale=0.0, max_sequence_length=64)),
    "hunyuan_image": (build_hunyuan_image_pipeline, dict()),
    "flux2": (build_flux2_klein_pipeline, dict(guidance_scale=1.0, max_sequence_length=32)),
}


def stream_ids(name, pipe, prompt):
    """The text tokens of the call, in the transformer's text order, from diffusers' encode_prompt steps."""
    tokenizer = pipe.tokenizer
    if name == "qwen_image":
        return tokenizer(QWEN_TEMPLATE.format(prompt))["input_ids"][QWEN_DROP:]
    if name == "hunyuan_image":
        glyph = [] if '"' not in prompt else [None] * min(pipe.tokenizer_2_max_length, len(glyph_text(prompt)) + 1)
        return glyph + tokenizer(QWEN_SYSTEM.format(prompt))["input_ids"][QWEN_DROP:][:pipe.tokenizer_max_length]
    return tokenizer(CHAT.format(prompt))["input_ids"]


def glyph_text(prompt):
    quoted = prompt.split('"')[1::2]
    return ". ".join(f'Text "{t}"' for t in quoted) + ". "  # ByT5: one token per byte, then </s>


def expected_positions(tokenizer, ids, word):
    found = set()
    for piece in (" " + word, word):
        piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
        for start in range(len(ids) - len(piece_ids) + 1):
            if ids[start:start + len(piece_ids)] == piece_ids:
                found.update(range(start, start + len(piece_ids)))
    return sorted(found)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_word_indices_are_the_family_tokenizers_tokens(name):
    build, _ = FAMILIES[name]
    pipe = build()
    ids = stream_ids(name, pipe, PROMPT)
    got = word_positions(pipe, name, PROMPT, ("red", "beside", "a"))
    expected = [expected_positions(pipe.tokenizer, ids, w) for w in ("red", "beside", "a")]
    assert got == expected
    assert len(expected[1]) > 1 and len(expected[2]) == 2  # a word of several tokens; a word twice


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_word_map_is_the_sum_of_its_token_maps(name):
    build, args = FAMILIES[name]
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    red = expected_positions(pipe.tokenizer, stream_ids(name, pipe, PROMPT), "red")
    call = dict(num_inference_steps=1, output_type="latent", height=32, width=32, **args)
    maps = []
    for tokens in (["red", "beside"], red):
        with da.apply(pipe, da.Capture(layers=[0, len(da.layers(pipe)) - 1], tokens=tokens)) as handle:
            pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **call)
            maps.append(handle.maps)
    words, by_index = maps
    assert words.tokens == ("red", "beside") and by_index.tokens == tuple(f"t{i}" for i in red)
    assert words.maps[:, :, :, 0].abs().sum() > 0
    assert torch.allclose(words.maps[:, :, :, 0], by_index.maps.sum(dim=3), atol=1e-6)


def test_hunyuan_glyph_tokens_come_first_and_truncation_is_refused():
    pipe = build_hunyuan_image_pipeline()
    prompt = 'a red sign that says "dog"'
    ids = stream_ids("hunyuan_image", pipe, prompt)
    assert word_positions(pipe, "hunyuan_image", prompt, ("red",)) == [expected_positions(pipe.tokenizer, ids, "red")]
    assert word_positions(pipe, "hunyuan_image", prompt, ("red",))[0][0] >= pipe.tokenizer_2_max_length
    with pytest.raises(ValueError, match="'dog' has no tokens in the prompt's text tokens"):
        word_positions(pipe, "hunyuan_image", PROMPT + " with a small black dog", ("dog",))  # past tokenizer_max_length


def test_families_without_a_tokenizer_refuse_with_one_line():
    for pipe, name in ((build_flux2_pipeline(), "flux2"), (build_qwen_image_pipeline(text_encoder=False), "qwen_image")):
        with pytest.raises(ValueError, match="without the pipeline's tokenizer"):
            word_positions(pipe, name, PROMPT, ("red",))
    with pytest.raises(ValueError, match="cannot find words in bria prompts"):
        word_positions(None, "bria", PROMPT, ("red",))
    with pytest.raises(ValueError, match="'cat'"):
        word_positions(build_z_image_pipeline(), "z_image", PROMPT, ("cat",))


@pytest.mark.parametrize("name, message", [("z_image", "'square' has no tokens in the prompt's text tokens"),
                                           ("flux2", r"\['square'\] lie past this call's 8 text tokens")])
def test_a_word_cut_by_the_calls_text_length_is_refused(name, message):
    build, args = FAMILIES[name]
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    with da.apply(pipe, da.Capture(layers=[0], tokens=["square"])):
        with pytest.raises(ValueError, match=message):
            pipe(prompt=PROMPT, num_inference_steps=1, output_type="latent", height=32, width=32,
                 **{**args, "max_sequence_length": 8})

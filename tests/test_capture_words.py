"""Capture's word lookup on the families that wrap the prompt in a template (or tokenize it their own way):
the looked-up text-token indices are those the family's own tokenizer gives the word inside the text the
pipeline encodes (tokenized here from the templates in diffusers' pipelines), and a word's map is the sum of
its tokens' maps."""
import functools

import pytest
import torch
from PIL import Image

import dit_attn as da
from dit_attn.capture.words import word_positions
from dit_attn.toy.bria import build_bria_pipeline
from dit_attn.toy.flux2 import build_flux2_klein_pipeline, build_flux2_pipeline, make_flux2_tokenizer
from dit_attn.toy.hunyuan_image import build_hunyuan_image_pipeline
from dit_attn.toy.longcat_image import build_longcat_image_pipeline
from dit_attn.toy.ovis_image import build_ovis_image_pipeline
from dit_attn.toy.qwen_image import build_qwen_image_edit_pipeline, build_qwen_image_pipeline
from dit_attn.toy.z_image import build_z_image_pipeline

torch.set_num_threads(1)

PROMPT = "a red circle beside a blue square"
QWEN_SYSTEM = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
               "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>")
QWEN_TEMPLATE = QWEN_SYSTEM + "\n<|im_start|>assistant\n"  # QwenImagePipeline; HunyuanImage ends at <|im_end|>
QWEN_DROP = 34
CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"  # the toy tokenizers' chat template
OVIS_SYSTEM = ("Describe the image by detailing the color, quantity, text, shape, size, texture, spatial relationships "
               "of the objects and background: ")  # OvisImagePipeline.system_prompt, in the user turn
EDIT_TEMPLATE = ("<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
                 "background), then explain how the user's text instruction should alter or modify the image. Generate a "
                 "new image that meets the user's requirements while maintaining consistency with the original input "
                 "where appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")
VISION = "<|vision_start|><|image_pad|><|vision_end|>"
MISTRAL_TEMPLATE = (  # Mistral Small 3's chat template for the system and user turns (text parts of content lists)
    "<s>{% for message in messages %}{% set content = message['content'] if message['content'] is string else "
    "message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ content }}[/SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}[INST]{{ content }}[/INST]{% endif %}{% endfor %}")
MISTRAL_PREFIX = "<s>[SYSTEM_PROMPT]{}[/SYSTEM_PROMPT][INST]"
DEV_TOKENS = 160  # FLUX.2 [dev]'s system message is 129 tokens long with the toy tokenizer
MISTRAL_SPECIAL = ["<s>", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]", "[/INST]", "[IMG]"]


def build_flux2_dev_pipeline():
    """Flux2Pipeline with a 30-layer, 16-wide Mistral 3 text encoder (the pipeline stacks hidden states 10, 20, 30)
    and a byte-level BPE tokenizer with Mistral's special tokens and chat template (transformers' Pixtral
    processor needs torchvision; the pipeline calls only its `apply_chat_template`)."""
    from diffusers import Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    tokenizer = make_flux2_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": MISTRAL_SPECIAL})
    tokenizer.chat_template = MISTRAL_TEMPLATE
    config = Mistral3Config(
        text_config=dict(model_type="mistral", hidden_size=16, intermediate_size=16, num_hidden_layers=30,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=8, vocab_size=len(tokenizer),
                         max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                           num_attention_heads=2, head_dim=8, image_size=32, patch_size=16),
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), spatial_merge_size=1)
    torch.manual_seed(0)
    encoder = Mistral3ForConditionalGeneration(config).eval()
    parts = build_flux2_pipeline().components
    return Flux2Pipeline(scheduler=parts["scheduler"], vae=parts["vae"], transformer=parts["transformer"],
                         text_encoder=encoder, tokenizer=tokenizer)


def picture(height=32, width=32, seed=2):
    return Image.fromarray((torch.rand(height, width, 3, generator=torch.Generator().manual_seed(seed)) * 255).byte().numpy())


@pytest.fixture(autouse=True)
def small_edit_reference(monkeypatch):
    """Qwen-Image-Edit's 1024² reference area shrunk to 32² (a 32×32 reference stays 32×32: 4 vision tokens)."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit_module

    original = edit_module.calculate_dimensions
    monkeypatch.setattr(edit_module, "calculate_dimensions", lambda area, ratio: original(32 * 32, ratio))


FAMILIES = {  # builder, family name, call arguments
    "qwen_image": (build_qwen_image_pipeline, "qwen_image", dict(true_cfg_scale=1.0, max_sequence_length=16)),
    "z_image": (build_z_image_pipeline, "z_image", dict(guidance_scale=0.0, max_sequence_length=64)),
    "hunyuan_image": (build_hunyuan_image_pipeline, "hunyuan_image", dict()),
    "flux2": (build_flux2_klein_pipeline, "flux2", dict(guidance_scale=1.0, max_sequence_length=32)),
    "flux2_dev": (build_flux2_dev_pipeline, "flux2", dict(max_sequence_length=DEV_TOKENS)),
    "qwen_image_edit": (build_qwen_image_edit_pipeline, "qwen_image", dict(true_cfg_scale=1.0, image=picture())),
    "bria": (functools.partial(build_bria_pipeline, text_encoder=True), "bria",
             dict(guidance_scale=1.0, max_sequence_length=12)),
    "ovis_image": (functools.partial(build_ovis_image_pipeline, text_encoder=True), "ovis_image",
                   dict(guidance_scale=1.0, max_sequence_length=12)),
    "longcat_image": (functools.partial(build_longcat_image_pipeline, text_encoder=True), "longcat_image",
                      dict(guidance_scale=1.0, enable_prompt_rewrite=False)),
}


def stream_ids(name, pipe, prompt, length=None):
    """The text tokens of the call, in the transformer's text order, from diffusers' encode_prompt steps, and
    where the prompt's tokens start among them."""
    tokenizer = pipe.tokenizer
    if name == "qwen_image":
        return tokenizer(QWEN_TEMPLATE.format(prompt))["input_ids"][QWEN_DROP:], 0
    if name == "hunyuan_image":
        glyph = [] if '"' not in prompt else [None] * min(pipe.tokenizer_2_max_length, len(glyph_text(prompt)) + 1)
        return glyph + tokenizer(QWEN_SYSTEM.format(prompt))["input_ids"][QWEN_DROP:][:pipe.tokenizer_max_length], 0
    if name == "qwen_image_edit":  # the processor repeats <|image_pad|> for the image's vision tokens
        ids = pipe.processor(text=[EDIT_TEMPLATE.format(VISION + prompt)], images=[picture()])["input_ids"][0]
        return list(ids)[pipe.prompt_template_encode_start_idx:], 0
    if name == "flux2_dev":  # padded after the prompt's tokens to max_sequence_length
        prefix = tokenizer(MISTRAL_PREFIX.format(pipe.system_message), add_special_tokens=False)["input_ids"]
        ids = tokenizer(MISTRAL_PREFIX.format(pipe.system_message) + prompt + "[/INST]", add_special_tokens=False)["input_ids"]
        length = length or DEV_TOKENS
        return (ids + [tokenizer.pad_token_id] * length)[:length], len(prefix)
    if name == "bria":  # T5 ids with </s>, zero states after them
        return tokenizer(prompt)["input_ids"], 0
    if name == "ovis_image":  # the user turn's header and the system prompt dropped
        return tokenizer(CHAT.format(OVIS_SYSTEM + prompt), add_special_tokens=False)["input_ids"][pipe.user_prompt_begin_id:], 0
    if name == "longcat_image":  # the prompt's own tokens (no quotes here), the template's prefix and suffix dropped
        return tokenizer(prompt, add_special_tokens=False)["input_ids"], 0
    return tokenizer(CHAT.format(prompt))["input_ids"], 0


def glyph_text(prompt):
    quoted = prompt.split('"')[1::2]
    return ". ".join(f'Text "{t}"' for t in quoted) + ". "  # ByT5: one token per byte, then </s>


def expected_positions(tokenizer, ids, word, start=0):
    found = set()
    for piece in (" " + word, word):
        piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
        for at in range(start, len(ids) - len(piece_ids) + 1):
            if ids[at:at + len(piece_ids)] == piece_ids:
                found.update(range(at, at + len(piece_ids)))
    return sorted(found)


def lookup_inputs(name):
    """What the recorder hands `word_positions` from the pipeline's encode_prompt call."""
    return {"qwen_image_edit": dict(image=picture()), "flux2_dev": dict(max_tokens=DEV_TOKENS)}.get(name, {})


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_word_indices_are_the_family_tokenizers_tokens(name):
    build, family, _ = FAMILIES[name]
    pipe = build()
    ids, start = stream_ids(name, pipe, PROMPT)
    got = word_positions(pipe, family, PROMPT, ("red", "beside", "a"), **lookup_inputs(name))
    expected = [expected_positions(pipe.tokenizer, ids, w, start) for w in ("red", "beside", "a")]
    assert got == expected
    assert len(expected[1]) > 1 and len(expected[2]) == 2  # a word of several tokens; a word twice


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_word_map_is_the_sum_of_its_token_maps(name):
    build, _, args = FAMILIES[name]
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    ids, start = stream_ids(name, pipe, PROMPT)
    red = expected_positions(pipe.tokenizer, ids, "red", start)
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
    ids, _ = stream_ids("hunyuan_image", pipe, prompt)
    assert word_positions(pipe, "hunyuan_image", prompt, ("red",)) == [expected_positions(pipe.tokenizer, ids, "red")]
    assert word_positions(pipe, "hunyuan_image", prompt, ("red",))[0][0] >= pipe.tokenizer_2_max_length
    with pytest.raises(ValueError, match="'dog' has no tokens in the prompt's text tokens"):
        word_positions(pipe, "hunyuan_image", PROMPT + " with a small black dog", ("dog",))  # past tokenizer_max_length


def test_longcat_quoted_text_is_one_token_per_character():
    """LongCat-Image tokenizes quoted text character by character, between the other pieces' own tokens."""
    pipe = build_longcat_image_pipeline(text_encoder=True, text_tokens=32)
    prompt = 'a sign that says "red" beside a cat'
    pieces = [pipe.tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("a sign that says ", *'"red"', " beside a cat")]
    ids = [i for piece in pieces for i in piece]
    quoted = len(pieces[0])
    assert word_positions(pipe, "longcat_image", prompt, ("red", "beside", "cat")) == [
        [quoted + 1, quoted + 2, quoted + 3], expected_positions(pipe.tokenizer, ids, "beside", quoted + 5),
        expected_positions(pipe.tokenizer, ids, "cat")]


def test_longcat_words_are_those_of_the_rewritten_prompt(monkeypatch):
    """The words are looked up in the prompt LongCat-Image encodes: after its prompt rewrite."""
    build, _, args = FAMILIES["longcat_image"]
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    rewritten = "a blue square beside a red circle"
    monkeypatch.setattr(pipe, "rewire_prompt", lambda prompt, device: [rewritten])
    red = expected_positions(pipe.tokenizer, stream_ids("longcat_image", pipe, rewritten)[0], "red")
    assert red != expected_positions(pipe.tokenizer, stream_ids("longcat_image", pipe, PROMPT)[0], "red")
    maps = []
    for tokens in (["red"], red):
        with da.apply(pipe, da.Capture(layers=[0], tokens=tokens)) as handle:
            pipe(prompt=PROMPT, num_inference_steps=1, output_type="latent", height=32, width=32,
                 generator=torch.Generator().manual_seed(0), **{**args, "enable_prompt_rewrite": True})
            maps.append(handle.maps.maps)
    assert torch.allclose(maps[0][:, :, :, 0], maps[1].sum(dim=3), atol=1e-6)


def test_qwen_image_edit_words_follow_the_images_vision_tokens():
    """Qwen-Image-Edit: the prompt's tokens follow as many vision tokens as the processor gives the image; Edit Plus:
    each image's "Picture i: " and vision tokens come first."""
    from diffusers import QwenImageEditPlusPipeline

    pipe = build_qwen_image_edit_pipeline()
    wide = picture(56, 112)
    ids = pipe.processor(text=[EDIT_TEMPLATE.format(VISION + PROMPT)], images=[wide])["input_ids"][0]
    ids = list(ids)[pipe.prompt_template_encode_start_idx:]
    assert ids.count(pipe.processor.image_token_id) == 8
    assert word_positions(pipe, "qwen_image", PROMPT, ("red", "a"), image=wide) == [
        expected_positions(pipe.tokenizer, ids, w) for w in ("red", "a")]
    with pytest.raises(ValueError, match="with the reference image the pipeline encodes them with"):
        word_positions(pipe, "qwen_image", PROMPT, ("red",))

    plus = QwenImageEditPlusPipeline(**pipe.components)
    header = EDIT_TEMPLATE[:EDIT_TEMPLATE.index("{}")]
    plus.prompt_template_encode_start_idx = len(pipe.tokenizer(header)["input_ids"])  # 64 with the real tokenizer
    images = [picture(), picture(112, 56, seed=3)]
    text = EDIT_TEMPLATE.format(f"Picture 1: {VISION}Picture 2: {VISION}" + PROMPT)
    ids = list(pipe.processor(text=[text], images=images)["input_ids"][0])[plus.prompt_template_encode_start_idx:]
    picture_a = len(pipe.tokenizer("Picture 1: " + VISION)["input_ids"]) + 3  # the word "a" in "Picture 1: "
    assert word_positions(plus, "qwen_image", PROMPT, ("red", "a"), image=images) == [
        expected_positions(pipe.tokenizer, ids, w, picture_a) for w in ("red", "a")]


def test_qwen_image_edit_words_with_true_cfg():
    """The negative prompt's encoding (the call's second encode_prompt) leaves the prompt's words as they are."""
    build, _, args = FAMILIES["qwen_image_edit"]
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    red = expected_positions(pipe.tokenizer, stream_ids("qwen_image_edit", pipe, PROMPT)[0], "red")
    maps = []
    for tokens in (["red"], red):
        with da.apply(pipe, da.Capture(layers=[1], tokens=tokens)) as handle:
            pipe(prompt=PROMPT, negative_prompt="a cat", num_inference_steps=1, output_type="latent", height=32,
                 width=32, generator=torch.Generator().manual_seed(0), **{**args, "true_cfg_scale": 2.0})
            maps.append(handle.maps.maps)
    assert torch.allclose(maps[0][:, :, :, 0], maps[1].sum(dim=3), atol=1e-6)


def test_flux2_dev_words_on_a_left_padding_processor():
    """FLUX.2 [dev]'s processor pads to max_sequence_length on its padding side; the words follow it."""
    pipe = build_flux2_dev_pipeline()
    pipe.tokenizer.padding_side = "left"
    ids, start = stream_ids("flux2_dev", pipe, PROMPT, length=DEV_TOKENS * 2)
    real = sum(1 for i in ids if i != pipe.tokenizer.pad_token_id)
    pad = DEV_TOKENS * 2 - real
    assert word_positions(pipe, "flux2", PROMPT, ("red", "a"), max_tokens=DEV_TOKENS * 2) == [
        [pad + p for p in expected_positions(pipe.tokenizer, ids[:real], w, start)] for w in ("red", "a")]


def test_families_without_a_tokenizer_refuse_with_one_line():
    for pipe, name in ((build_flux2_pipeline(), "flux2"), (build_qwen_image_pipeline(text_encoder=False), "qwen_image"),
                       (build_bria_pipeline(), "bria"), (build_ovis_image_pipeline(), "ovis_image"),
                       (build_longcat_image_pipeline(), "longcat_image")):
        with pytest.raises(ValueError, match="without the pipeline's tokenizer"):
            word_positions(pipe, name, PROMPT, ("red",))
    with pytest.raises(ValueError, match="cannot find words in sana prompts"):
        word_positions(None, "sana", PROMPT, ("red",))


@pytest.mark.parametrize("name", ["z_image", "bria", "ovis_image", "longcat_image", "qwen_image_edit", "flux2_dev"])
def test_a_word_not_in_the_prompt_is_refused(name):
    build, family, _ = FAMILIES[name]
    with pytest.raises(ValueError, match=r"'cat' not in the prompt .*its words: a, red, circle"):
        word_positions(build(), family, PROMPT, ("cat",), **lookup_inputs(name))


@pytest.mark.parametrize("name, length, message", [
    ("z_image", 8, "'square' has no tokens in the prompt's text tokens"),
    ("flux2", 8, r"\['square'\] lie past this call's 8 text tokens"),
    ("bria", 6, r"\['square'\] lie past this call's 6 text tokens"),
    ("ovis_image", 6, r"\['square'\] lie past this call's 6 text tokens"),
    ("flux2_dev", 136, "'square' has no tokens in the prompt's text tokens"),
])
def test_a_word_cut_by_the_calls_text_length_is_refused(name, length, message):
    build, _, args = FAMILIES[name]
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    with da.apply(pipe, da.Capture(layers=[0], tokens=["square"])):
        with pytest.raises(ValueError, match=message):
            pipe(prompt=PROMPT, num_inference_steps=1, output_type="latent", height=32, width=32,
                 **{**args, "max_sequence_length": length})


def test_a_word_where_a_cut_t5_text_puts_its_end_token_is_refused():
    """T5 cut at max_sequence_length ends in </s>: a word whose token would sit at the last position is cut away."""
    build, family, args = FAMILIES["bria"]
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    ids = pipe.tokenizer(PROMPT, max_length=64, truncation=True)["input_ids"]
    square = pipe.tokenizer("square", add_special_tokens=False)["input_ids"]
    last = max(i for i in range(len(ids)) if ids[i : i + len(square)] == square) + len(square) - 1
    cut = pipe.tokenizer(PROMPT, max_length=last + 1, truncation=True)["input_ids"]
    assert cut[last] == pipe.tokenizer.eos_token_id  # the independent fact the recorder must follow
    with da.apply(pipe, da.Capture(layers=[0], tokens=["square"])):
        with pytest.raises(ValueError, match=r"\['square'\] lie past this call's"):
            pipe(prompt=PROMPT, num_inference_steps=1, output_type="latent", height=32, width=32,
                 **{**args, "max_sequence_length": last + 1})


def test_longcat_word_past_its_token_limit_is_refused():
    pipe = build_longcat_image_pipeline(text_encoder=True, text_tokens=6)
    with pytest.raises(ValueError, match="'square' has no tokens in the prompt's text tokens"):
        word_positions(pipe, "longcat_image", PROMPT, ("square",))

"""Where the words of a prompt sit in a family's text stream.

SD3, FLUX.1, Chroma, Wan and Bria 3.2: the stream is their tokenizers' outputs one after another (SD3 [CLIP,
padded to the pipeline's `tokenizer_max_length` ; T5], the others [T5]); a word is found by its own token ids
inside the prompt's ids. Qwen-Image (Edit, Edit Plus), HunyuanImage 2.1, Z-Image, FLUX.2 [dev] and [klein],
Ovis-Image and HunyuanVideo 1.5 wrap the prompt in a template (a system prompt whose first tokens are dropped,
or a chat template) and tokenize the whole text; LongCat-Image tokenizes the prompt's pieces (quoted text one
character at a time) between a template's prefix and suffix that it drops. A word owns the tokens whose
characters overlap the word's characters in the prompt; a word split into several tokens owns all of them.
Qwen-Image-Edit's template holds the reference images' vision tokens, as many per image as the processor
gives it; FLUX.2 [dev] pads (on its processor's padding side) or cuts its tokens to max_sequence_length.
LongCat-Image, FLUX.2 [dev] and Qwen-Image-Edit take the prompt (rewritten, upsampled) and those inputs from the
call's first `encode_prompt` (`words_from_encoder`).
HunyuanImage 2.1 and HunyuanVideo 1.5 reorder each row's context by its masks: the valid image-context tokens
(image-to-video), then the valid ByT5 glyph tokens, then the valid Qwen tokens; a word's positions are its
Qwen tokens' positions there (the glyph copy of a quoted word is not looked up).
"""
from __future__ import annotations

import re

# family name → the pipeline's tokenizers whose tokens make the text stream, in order, each with the pipeline
# attribute holding the segment's length (None: the rest) and the encoder that must be present (else zeros)
TEXT_SEGMENTS = {
    "sd3": (("tokenizer", "tokenizer_max_length", "text_encoder"), ("tokenizer_3", None, "text_encoder_3")),
    "flux": (("tokenizer_2", None, "text_encoder_2"),),
    "chroma": (("tokenizer", None, "text_encoder"),),
    "wan": (("tokenizer", None, "text_encoder"),),  # T5, each prompt padded with zero states after its tokens
    "bria": (("tokenizer", None, "text_encoder"),),  # T5 (Bria 3.2), zero states after the prompt's tokens
}


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special, truncation=False)["input_ids"])


def _occurrences(ids: list[int], piece: list[int]) -> list[int]:
    found = []
    for start in range(len(ids) - len(piece) + 1):
        if ids[start:start + len(piece)] == piece:
            found.extend(range(start, start + len(piece)))
    return found


_PUNCTUATION = ".,;:!?\"'()"
TEMPLATED = ("qwen_image", "hunyuan_image", "z_image", "flux2", "hunyuan_video15", "ovis_image", "longcat_image")
IMAGE_TEMPLATES = ("QwenImageEditPipeline", "QwenImageEditPlusPipeline")  # templates holding reference images

# pipelines whose words are looked up in the prompt their first `encode_prompt` call of a pipeline call gets (after
# LongCat-Image's prompt rewrite, FLUX.2 [dev]'s caption upsampling), with that call's inputs the lookup needs
ENCODER_INPUTS = {"LongCatImagePipeline": (), "Flux2Pipeline": ("max_sequence_length",),
                  "QwenImageEditPipeline": ("image",), "QwenImageEditPlusPipeline": ("image",)}


def words_from_encoder(pipe) -> tuple[str, ...] | None:
    """The `encode_prompt` inputs `word_positions` needs for `pipe` (None: the prompt of `check_inputs` serves)."""
    return ENCODER_INPUTS.get(type(pipe).__name__)


def prompt_words(prompt: str) -> list[str]:
    return [w.strip(_PUNCTUATION) for w in prompt.split() if w.strip(_PUNCTUATION)]


def _word_spans(prompt: str, word: str) -> list[tuple[int, int]]:
    """Character spans of `word` (case-insensitive) among the prompt's words, as `prompt_words` splits them,
    each with the spaces before it (a byte-level tokenizer's word piece starts with them)."""
    spans = []
    for match in re.finditer(r"( *)(\S+)", prompt):
        text = match.group(2)
        stripped = text.strip(_PUNCTUATION)
        if stripped and stripped.lower() == word.lower():
            lead = len(text) - len(text.lstrip(_PUNCTUATION))
            start = match.start(2) + lead
            spans.append((match.start(1) if lead == 0 else start, start + len(stripped)))
    return spans


def check_words_in_prompt(prompt: str, words) -> None:
    missing = [w for w in words if w.lower() not in {p.lower() for p in prompt_words(prompt)}]
    if missing:
        raise ValueError(f"Capture: {', '.join(map(repr, missing))} not in the prompt {prompt!r}; "
                         f"its words: {', '.join(prompt_words(prompt))}")


def word_positions(pipe, family_name: str, prompt: str, words: tuple[str, ...],
                   max_tokens: int | None = None, image=None) -> list[list[int]]:
    """For each word, its positions in the call's text stream (sorted); ValueError for a word not in the prompt.
    `max_tokens`: the call truncates the templated text to that many tokens (its max_sequence_length);
    `image`: Qwen-Image-Edit's reference image(s) as its `encode_prompt` gets them."""
    if family_name in TEMPLATED:
        check_words_in_prompt(prompt, words)
        return _templated_positions(pipe, family_name, prompt, words, max_tokens, image)
    segments = TEXT_SEGMENTS.get(family_name)
    if segments is None:
        raise ValueError(f"Capture cannot find words in {family_name} prompts (families: "
                         f"{', '.join((*TEXT_SEGMENTS, *TEMPLATED))}); give text-token indices as tokens instead")
    check_words_in_prompt(prompt, words)
    if not any(getattr(pipe, t, None) is not None and getattr(pipe, e, None) is not None for t, _, e in segments):
        _tokenizer_of(None, family_name)
    positions: list[list[int]] = [[] for _ in words]
    offset = 0
    for tokenizer_name, length_name, encoder_name in segments:
        tokenizer = getattr(pipe, tokenizer_name, None)
        length = getattr(pipe, length_name) if length_name is not None else None
        if tokenizer is not None and getattr(pipe, encoder_name, None) is not None:
            ids = _ids(tokenizer, prompt, True)
            if length is not None and len(ids) > length:  # cut as the pipeline's tokenizer cuts: its end token last
                ids = ids[: length - 1]
            for i, word in enumerate(words):
                for variant in dict.fromkeys((word, word.lower())):
                    positions[i] += [offset + p for p in _occurrences(ids, _ids(tokenizer, variant, False))]
        if length is None:
            break
        offset += length
    for word, found in zip(words, positions):
        if not found:
            raise ValueError(f"Capture: the word {word!r} has no tokens of its own in the prompt's text tokens "
                             f"(truncated, or split differently inside the prompt); give text-token indices instead")
    return [sorted(set(p)) for p in positions]


def _tokenizer_of(pipe, family_name: str):
    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is None or getattr(pipe, "text_encoder", None) is None:
        raise ValueError(f"Capture cannot find words without the pipeline's tokenizer and text encoder "
                         f"({family_name} pipeline built without them); give text-token indices instead")
    return tokenizer


def _offsets(tokenizer, text: str, special: bool = True) -> list[tuple[int, int]]:
    return [tuple(o) for o in tokenizer(text, return_offsets_mapping=True, truncation=False,
                                        add_special_tokens=special)["offset_mapping"]]


_NO_TEXT = (-1, -1)  # the span of a token that holds no prompt characters (image placeholder, padding)


def _stream_spans(pipe, family_name: str, prompt: str, image, max_tokens: int | None
                  ) -> tuple[list[tuple[int, int]], int, int | None]:
    """The character spans, in `prompt`'s coordinates, of the text stream's tokens from the prompt's encoder
    (tokens of the template outside the prompt fall outside it), the text-stream tokens ahead of them, and
    the most tokens the pipeline keeps (None: as many as the call's text length)."""
    name = type(pipe).__name__
    if name in IMAGE_TEMPLATES:
        return _qwen_edit_spans(pipe, prompt, image), 0, None
    if family_name == "longcat_image":
        return _longcat_spans(pipe, prompt), 0, None
    if family_name == "flux2" and name == "Flux2Pipeline":
        return _mistral_spans(pipe, prompt, max_tokens or pipe.tokenizer_max_length), 0, None
    if family_name in ("qwen_image", "hunyuan_image"):
        template = getattr(pipe, "prompt_template_encode", None)
        if template is None or template.count("{}") != 1 or "<|vision_start|>" in template:
            raise ValueError(f"Capture cannot find words in {name} prompts (its template holds images); "
                             "give text-token indices instead")
        ahead = _glyph_tokens(pipe, family_name, prompt) if family_name == "hunyuan_image" else 0
        text, start = template.format(prompt), template.index("{}")
        return _shifted(_offsets(pipe.tokenizer, text)[pipe.prompt_template_encode_start_idx:], start), ahead, \
            pipe.tokenizer_max_length
    if family_name == "hunyuan_video15":
        messages = [{"role": "system", "content": pipe.system_message}, {"role": "user", "content": prompt}]
        text = pipe.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        images = pipe.vision_num_semantic_tokens if getattr(pipe, "image_encoder", None) is not None else 0
        spans = _shifted(_offsets(pipe.tokenizer, text)[pipe.prompt_template_encode_start_idx:], text.rindex(prompt))
        return spans, images + _glyph_tokens(pipe, family_name, prompt), pipe.tokenizer_max_length
    if family_name == "ovis_image":  # the system prompt rides in the user turn; its first tokens are dropped
        text = pipe._get_messages(prompt)[0]
        return _shifted(_offsets(pipe.tokenizer, text, special=False)[pipe.user_prompt_begin_id:], text.rindex(prompt)), \
            0, None
    if family_name == "flux2" and not hasattr(pipe, "_get_qwen3_prompt_embeds"):
        raise ValueError(f"Capture finds words on FLUX.2 [dev] and [klein], not in {name} prompts; "
                         "give text-token indices instead")
    messages = [{"role": "user", "content": prompt}]
    text = pipe.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                              enable_thinking=family_name == "z_image")
    return _shifted(_offsets(pipe.tokenizer, text), text.rindex(prompt)), 0, None


def _shifted(spans, start: int) -> list[tuple[int, int]]:
    return [_NO_TEXT if (a, b) == _NO_TEXT else (a - start, b - start) for a, b in spans]


def _glyph_tokens(pipe, family_name: str, prompt: str) -> int:
    """HunyuanImage and HunyuanVideo 1.5 put the glyph encoder's valid tokens (quoted text of the prompt) ahead
    of the prompt's."""
    if family_name == "hunyuan_video15":
        from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import extract_glyph_texts as extract
    else:
        from diffusers.pipelines.hunyuan_image.pipeline_hunyuanimage import extract_glyph_text as extract

    glyph = extract(prompt)
    if glyph is None or getattr(pipe, "tokenizer_2", None) is None:
        return 0
    ids = pipe.tokenizer_2(glyph, padding="max_length", max_length=pipe.tokenizer_2_max_length, truncation=True,
                           add_special_tokens=True)
    return int(sum(ids["attention_mask"]))


def _padded(spans: list[tuple[int, int]], length: int, side: str) -> list[tuple[int, int]]:
    spans = spans[:length]
    pad = [_NO_TEXT] * (length - len(spans))
    return pad + spans if side == "left" else spans + pad


def _longcat_spans(pipe, prompt: str) -> list[tuple[int, int]]:
    """LongCat-Image tokenizes the prompt piece by piece (quoted text one character at a time), cuts and pads
    the pieces' tokens to `tokenizer_max_length` and drops its template's prefix and suffix from the states."""
    from diffusers.pipelines.longcat_image.pipeline_longcat_image import split_quotation

    spans, at = [], 0
    for piece, quoted in split_quotation(prompt):
        at = prompt.index(piece, at)
        for i, part in enumerate(piece if quoted else [piece]):
            begin = at + (i if quoted else 0)
            spans += [(begin + a, begin + b) for a, b in _offsets(pipe.tokenizer, part, special=False)]
        at += len(piece)
    return _padded(spans, pipe.tokenizer_max_length, pipe.tokenizer.padding_side)


def _qwen_edit_spans(pipe, prompt: str, image) -> list[tuple[int, int]]:
    """Qwen-Image-Edit (Plus) encode the prompt after its reference images' vision tokens, as many per image as
    the processor gives it: the text is the template with each `<|image_pad|>` repeated that many times."""
    if image is None:
        raise ValueError(f"Capture finds words in {type(pipe).__name__} prompts with the reference image the pipeline "
                         "encodes them with: call it with image=...")
    template = pipe.prompt_template_encode
    images = image if isinstance(image, list) else [image]
    if type(pipe).__name__ == "QwenImageEditPlusPipeline":  # "Picture i: " and its vision tokens ahead of the prompt
        pictures = "".join(f"Picture {i + 1}: <|vision_start|><|image_pad|><|vision_end|>" for i in range(len(images)))
        text, start = template.format(pictures + prompt), template.index("{}") + len(pictures)
    else:
        text, start = template.format(prompt), template.index("{}")
    processor = pipe.processor
    grids = processor.image_processor(images=images, return_tensors="pt")["image_grid_thw"]
    merge = processor.image_processor.merge_size ** 2
    pad = processor.image_token
    pieces = text.split(pad)
    if len(pieces) != len(grids) + 1:
        raise ValueError(f"Capture: {type(pipe).__name__}'s template holds {len(pieces) - 1} images, the call {len(grids)}")
    expanded = pieces[0]
    for grid, piece in zip(grids, pieces[1:]):
        expanded += pad * int(grid.prod() // merge) + piece
    shift = len(expanded) - len(text)  # the prompt follows every image
    return _shifted(_offsets(pipe.tokenizer, expanded)[pipe.prompt_template_encode_start_idx:], start + shift)


def _mistral_spans(pipe, prompt: str, length: int) -> list[tuple[int, int]]:
    """FLUX.2 [dev] encodes the system message and the prompt in Mistral's chat template, padded (or cut) to
    `max_sequence_length` by its processor; the transformer sees every one of those tokens."""
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input

    messages = format_input(prompts=[prompt], system_message=pipe.system_message)
    encoded = pipe.tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=True, return_dict=True,
                                                 padding="max_length", truncation=True, max_length=length)
    ids, mask = list(encoded["input_ids"][0]), list(encoded["attention_mask"][0])
    text = pipe.tokenizer.apply_chat_template(messages[0], add_generation_prompt=False, tokenize=False)
    text = text if isinstance(text, str) else text[0]
    tokenizer = getattr(pipe.tokenizer, "tokenizer", pipe.tokenizer)
    offsets = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    valid = [i for i, m in enumerate(mask) if m]
    if [ids[i] for i in valid] != list(offsets["input_ids"])[:len(valid)]:
        raise ValueError("Capture cannot line up FLUX.2's chat-template tokens with the prompt's characters; "
                         "give text-token indices instead")
    spans = [_NO_TEXT] * len(ids)
    for k, i in enumerate(valid):
        spans[i] = tuple(offsets["offset_mapping"][k])
    return _shifted(spans, text.rindex(prompt.replace("[IMG]", "")))


def _templated_positions(pipe, family_name: str, prompt: str, words: tuple[str, ...],
                         max_tokens: int | None, image=None) -> list[list[int]]:
    _tokenizer_of(pipe, family_name)
    spans, ahead, most = _stream_spans(pipe, family_name, prompt, image, max_tokens)
    spans = spans[:max_tokens][:most]
    positions = []
    for word in words:
        word_spans = _word_spans(prompt, word)
        found = [ahead + i for i, (a, b) in enumerate(spans)
                 if (a, b) != _NO_TEXT and any(a < stop and b > begin for begin, stop in word_spans)]
        if not found:
            raise ValueError(f"Capture: the word {word!r} has no tokens in the prompt's text tokens (truncated); "
                             "give text-token indices instead")
        positions.append(found)
    return positions

"""Where the words of a prompt sit in a family's text stream.

SD3, FLUX.1, Chroma and Wan: the stream is their tokenizers' outputs one after another (SD3 [CLIP,
padded to the pipeline's `tokenizer_max_length` ; T5], FLUX.1, Chroma and Wan's cross-attention [T5]);
a word is found by its own token ids inside the prompt's ids. Qwen-Image, HunyuanImage 2.1, Z-Image,
FLUX.2 [klein] and HunyuanVideo 1.5 wrap the prompt in a template (a system prompt whose first tokens are
dropped, or a chat template) and tokenize
the whole text: a word owns the tokens whose characters overlap the word's characters in the prompt.
A word split into several tokens owns all of them.
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
TEMPLATED = ("qwen_image", "hunyuan_image", "z_image", "flux2", "hunyuan_video15")


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
                   max_tokens: int | None = None) -> list[list[int]]:
    """For each word, its positions in the call's text stream (sorted); ValueError for a word not in the prompt.
    `max_tokens`: the call truncates the templated text to that many tokens (its max_sequence_length)."""
    if family_name in TEMPLATED:
        check_words_in_prompt(prompt, words)
        return _templated_positions(pipe, family_name, prompt, words, max_tokens)
    segments = TEXT_SEGMENTS.get(family_name)
    if segments is None:
        raise ValueError(f"Capture cannot find words in {family_name} prompts (families: "
                         f"{', '.join((*TEXT_SEGMENTS, *TEMPLATED))}); give text-token indices as tokens instead")
    check_words_in_prompt(prompt, words)
    positions: list[list[int]] = [[] for _ in words]
    offset = 0
    for tokenizer_name, length_name, encoder_name in segments:
        tokenizer = getattr(pipe, tokenizer_name, None)
        length = getattr(pipe, length_name) if length_name is not None else None
        if tokenizer is not None and getattr(pipe, encoder_name, None) is not None:
            ids = _ids(tokenizer, prompt, True)
            if length is not None:
                ids = ids[:length]
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


def _template_text(pipe, family_name: str, prompt: str) -> tuple[str, int, int, int, int | None]:
    """The text the pipeline tokenizes for `prompt`: (text, where the prompt starts in it, tokens dropped
    from the front, text-stream tokens ahead of the kept ones, most kept tokens or None)."""
    if family_name in ("qwen_image", "hunyuan_image"):
        template = getattr(pipe, "prompt_template_encode", None)
        if template is None or template.count("{}") != 1 or "<|vision_start|>" in template:
            raise ValueError(f"Capture cannot find words in {type(pipe).__name__} prompts (its template holds images); "
                             "give text-token indices instead")
        ahead = _glyph_tokens(pipe, family_name, prompt) if family_name == "hunyuan_image" else 0
        return (template.format(prompt), template.index("{}"), pipe.prompt_template_encode_start_idx, ahead,
                pipe.tokenizer_max_length)
    if family_name == "hunyuan_video15":
        messages = [{"role": "system", "content": pipe.system_message}, {"role": "user", "content": prompt}]
        text = pipe.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        images = pipe.vision_num_semantic_tokens if getattr(pipe, "image_encoder", None) is not None else 0
        return (text, text.rindex(prompt), pipe.prompt_template_encode_start_idx, images + _glyph_tokens(pipe, family_name, prompt),
                pipe.tokenizer_max_length)
    if family_name == "flux2" and not hasattr(pipe, "_get_qwen3_prompt_embeds"):
        raise ValueError(f"Capture finds words on FLUX.2 [klein] (Qwen3 chat template), not in {type(pipe).__name__} "
                         "prompts; give text-token indices instead")
    messages = [{"role": "user", "content": prompt}]
    text = pipe.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                              enable_thinking=family_name == "z_image")
    return text, text.rindex(prompt), 0, 0, None


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


def _templated_positions(pipe, family_name: str, prompt: str, words: tuple[str, ...],
                         max_tokens: int | None) -> list[list[int]]:
    tokenizer = _tokenizer_of(pipe, family_name)
    text, start, dropped, ahead, most = _template_text(pipe, family_name, prompt)
    offsets = tokenizer(text, return_offsets_mapping=True, truncation=False)["offset_mapping"]
    offsets = offsets[:max_tokens][dropped:][:most]
    positions = []
    for word in words:
        spans = [(start + a, start + b) for a, b in _word_spans(prompt, word)]
        found = [ahead + i for i, (a, b) in enumerate(offsets) if any(a < stop and b > begin for begin, stop in spans)]
        if not found:
            raise ValueError(f"Capture: the word {word!r} has no tokens in the prompt's text tokens (truncated); "
                             "give text-token indices instead")
        positions.append(found)
    return positions

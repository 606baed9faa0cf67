"""Where the words of a prompt sit in a family's text stream.

Each family's text stream is its tokenizers' outputs one after another: SD3 [CLIP, padded to the
pipeline's `tokenizer_max_length` ; T5], FLUX.1 and Chroma [T5]. A word is found by its own token
ids inside the prompt's ids; a word split into several tokens owns all of them.
"""
from __future__ import annotations

# family name → the pipeline's tokenizers whose tokens make the text stream, in order, each with the pipeline
# attribute holding the segment's length (None: the rest) and the encoder that must be present (else zeros)
TEXT_SEGMENTS = {
    "sd3": (("tokenizer", "tokenizer_max_length", "text_encoder"), ("tokenizer_3", None, "text_encoder_3")),
    "flux": (("tokenizer_2", None, "text_encoder_2"),),
    "chroma": (("tokenizer", None, "text_encoder"),),
}


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special, truncation=False)["input_ids"])


def _occurrences(ids: list[int], piece: list[int]) -> list[int]:
    found = []
    for start in range(len(ids) - len(piece) + 1):
        if ids[start:start + len(piece)] == piece:
            found.extend(range(start, start + len(piece)))
    return found


def prompt_words(prompt: str) -> list[str]:
    return [w.strip(".,;:!?\"'()") for w in prompt.split() if w.strip(".,;:!?\"'()")]


def check_words_in_prompt(prompt: str, words) -> None:
    missing = [w for w in words if w.lower() not in {p.lower() for p in prompt_words(prompt)}]
    if missing:
        raise ValueError(f"Capture: {', '.join(map(repr, missing))} not in the prompt {prompt!r}; "
                         f"its words: {', '.join(prompt_words(prompt))}")


def word_positions(pipe, family_name: str, prompt: str, words: tuple[str, ...]) -> list[list[int]]:
    """For each word, its positions in the call's text stream (sorted); ValueError for a word not in the prompt."""
    segments = TEXT_SEGMENTS.get(family_name)
    if segments is None:
        raise ValueError(f"Capture cannot find words in {family_name} prompts yet (families: "
                         f"{', '.join(TEXT_SEGMENTS)}); give text-token indices as tokens instead")
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

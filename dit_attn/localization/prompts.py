"""Quoted text in prompts: `a sign that says "A" in red ...`."""
from __future__ import annotations

import re

QUOTED = re.compile(r'"([^"]*)"|“([^”]*)”')


def _inner_group(match: re.Match) -> int:
    return 1 if match.group(1) is not None else 2


def quoted_text(prompt: str) -> str | None:
    """The first quoted text of a prompt, or None."""
    match = QUOTED.search(prompt)
    return None if match is None else match.group(_inner_group(match))


def _replace_inner(match: re.Match, inner: str) -> str:
    group = _inner_group(match)
    start, end = match.span(group)
    whole = match.group(0)
    return whole[: start - match.start()] + inner + whole[end - match.start():]


def with_quoted_text(prompt: str, text: str) -> str:
    """The prompt with its first quoted text replaced by `text`."""
    if '"' in text:
        raise ValueError(f"the new text must not contain double quotes, got {text!r}")
    match = QUOTED.search(prompt)
    if match is None:
        raise ValueError(f'the prompt has no quoted text to replace (write it as: a sign that says "TEXT"): {prompt!r}')
    return prompt[: match.start()] + _replace_inner(match, text) + prompt[match.end():]


def guarded_prompt(prompt: str, blocklist: tuple[str, ...], replacement: str) -> str | None:
    """The prompt with every blocked word inside quotes replaced, or None when no quoted
    word is blocked. Case-insensitive, whole words only."""
    pattern = re.compile(r"(?<!\w)(?:" + "|".join(re.escape(w) for w in blocklist) + r")(?!\w)", re.IGNORECASE)
    changed = False

    def replace(match: re.Match) -> str:
        nonlocal changed
        inner, n = pattern.subn(lambda _: replacement, match.group(_inner_group(match)))
        changed = changed or n > 0
        return _replace_inner(match, inner)

    result = QUOTED.sub(replace, prompt)
    return result if changed else None

"""TextGuard: blocked words in quoted prompt text are patched away in the text layers."""
from __future__ import annotations

from ..edits import TextGuard
from .patching import TextPatchController
from .prompts import guarded_prompt


class GuardController(TextPatchController):
    """Reads the prompt of each pipeline call (from its `check_inputs`, which every
    supported pipeline calls first with the prompt) and patches the rows of prompts with
    blocked words with their guarded twins, from step 0."""

    def __init__(self, pipe, edit: TextGuard):
        super().__init__(pipe, edit.layers, 0.0, self._row_prompts)
        self.edit = edit
        self.prompts: list | None = None
        self._wrapped = False

    def install(self) -> None:
        original = self.pipe.check_inputs

        def check_inputs(prompt, *args, **kwargs):
            self.prompts = [prompt] if isinstance(prompt, str) else (list(prompt) if prompt is not None else None)
            return original(prompt, *args, **kwargs)

        self._shadowed = vars(self.pipe).get("check_inputs")
        self.pipe.check_inputs = check_inputs
        self._wrapped = True

    def unwrap(self) -> None:
        super().unwrap()
        if not self._wrapped:
            return
        if self._shadowed is not None:
            self.pipe.check_inputs = self._shadowed
        else:
            del self.pipe.check_inputs
        self._wrapped = False

    def _row_prompts(self, rows: int) -> list[str | None]:
        if self.prompts is None:
            raise ValueError("TextGuard needs the prompt text: call the pipeline with prompt=..., not prompt_embeds")
        if rows % len(self.prompts):
            raise RuntimeError(f"TextGuard: {rows} conditional rows for {len(self.prompts)} prompts")
        per_prompt = rows // len(self.prompts)
        guarded = [guarded_prompt(p, self.edit.blocklist, self.edit.replacement) for p in self.prompts]
        return [guarded[i // per_prompt] for i in range(rows)]

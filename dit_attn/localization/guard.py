"""TextGuard: blocked words in quoted prompt text are patched away in the text layers."""
from __future__ import annotations

from ..edits import TextGuard
from ..families import Family
from ..hooks.pipeline import capture_prompts
from .patching import TextPatchController
from .prompts import guarded_prompt


class GuardController(TextPatchController):
    """Reads the prompt of each pipeline call (from its `check_inputs`) and patches the rows of
    prompts with blocked words with their guarded twins, from step 0."""

    def __init__(self, pipe, family: Family, edit: TextGuard):
        super().__init__(pipe, family, edit.layers, 0.0, self._row_prompts, edit_name="TextGuard")
        self.edit = edit
        self.prompts: list | None = None
        self._capture = None

    def _record(self, prompt) -> None:
        self.prompts = [prompt] if isinstance(prompt, str) else (list(prompt) if prompt is not None else None)

    def install(self) -> None:
        super().install()
        if hasattr(type(self.pipe), "check_inputs"):
            self._capture = capture_prompts(self.pipe, self._record)

    def _watches_encoder(self) -> bool:
        # Z-Image's pipelines check nothing: the prompt is read from their own encode_prompt call
        return super()._watches_encoder() or not hasattr(type(self.pipe), "check_inputs")

    def _pipeline_encodes(self, args: tuple, kwargs: dict) -> None:
        super()._pipeline_encodes(args, kwargs)
        if not hasattr(type(self.pipe), "check_inputs"):
            self._record(kwargs["prompt"] if "prompt" in kwargs else (args[0] if args else None))

    def unwrap(self) -> None:
        super().unwrap()
        if self._capture is not None:
            self._capture.undo()
            self._capture = None

    def _row_prompts(self, rows: int) -> list[str | None]:
        if self.prompts is None:
            raise ValueError("TextGuard needs the prompt text: call the pipeline with prompt=..., not prompt_embeds")
        if rows % len(self.prompts):
            raise RuntimeError(f"TextGuard: {rows} conditional rows for {len(self.prompts)} prompts")
        per_prompt = rows // len(self.prompts)
        guarded = [guarded_prompt(p, self.edit.blocklist, self.edit.replacement) for p in self.prompts]
        return [guarded[i // per_prompt] for i in range(rows)]

"""Build the queued app and serve it (by default on 127.0.0.1 only)."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import gradio as gr

from .models import ModelRegistry
from .ui import CSS, build_blocks


def _output_dir(output_dir: str | None) -> str:
    """Where the app writes its PNGs: a fresh temporary directory, removed at exit, unless given."""
    if output_dir is None:
        output_dir = tempfile.mkdtemp(prefix="dit-attn-app-")
        atexit.register(shutil.rmtree, output_dir, True)
    return os.path.abspath(output_dir)


def create_app(registry: ModelRegistry, *, output_dir: str | None = None, concurrency: int = 1, max_queue: int = 16) -> gr.Blocks:
    """The page with a queue: `concurrency` generations at once, at most `max_queue` waiting."""
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError(f"concurrency must be an integer >= 1, got {concurrency!r}")
    if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
        raise ValueError(f"max queue size must be an integer >= 1, got {max_queue!r}")
    blocks = build_blocks(registry, _output_dir(output_dir))
    return blocks.queue(default_concurrency_limit=concurrency, max_size=max_queue)


def serve(registry: ModelRegistry, *, host: str = "127.0.0.1", port: int = 7860, concurrency: int = 1, max_queue: int = 16,
          output_dir: str | None = None, block: bool = True) -> gr.Blocks:
    """Launch the app; with block=False return once the server is up (the caller closes it with `.close()`)."""
    output_dir = _output_dir(output_dir)
    app = create_app(registry, output_dir=output_dir, concurrency=concurrency, max_queue=max_queue)
    # The images the handlers return are served from output_dir; no other path is opened up.
    app.launch(server_name=host, server_port=port, prevent_thread_lock=not block, show_error=False, quiet=not block,
               allowed_paths=[output_dir], css=CSS)
    return app

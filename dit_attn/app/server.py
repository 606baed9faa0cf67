"""Build the queued app and serve it (by default on 127.0.0.1 only, without a login)."""
from __future__ import annotations

import atexit
import ipaddress
import os
import shutil
import sys
import tempfile

import gradio as gr

from ..limits import MAX_UPLOAD_BYTES
from .models import ModelRegistry
from .ui import CSS, build_blocks

AUTH_ENV = "DIT_ATTN_APP_AUTH"  # USER:PASSWORD, read when serve() is given no auth


def _output_dir(output_dir: str | None) -> str:
    """Where the app writes its PNGs: a fresh temporary directory, removed at exit, unless given."""
    if output_dir is None:
        output_dir = tempfile.mkdtemp(prefix="dit-attn-app-")
        atexit.register(shutil.rmtree, output_dir, True)
    return os.path.abspath(output_dir)


def parse_auth(text: str | None) -> tuple[str, str] | None:
    """'USER:PASSWORD' → (user, password) for Gradio's login page; None or '' → None (no login)."""
    if text is None or not text.strip():
        return None
    user, sep, password = text.partition(":")
    if not sep or not user.strip() or not password:
        raise ValueError(f"auth must be USER:PASSWORD with a non-empty user and password (--auth or {AUTH_ENV})")
    return user.strip(), password


def is_loopback(host: str) -> bool:
    """Whether `host` listens on this machine only ('localhost', 127.0.0.0/8, ::1)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def exposure_warning(host: str, port: int, registry: ModelRegistry, auth) -> str | None:
    """The warning `serve` prints when the server listens beyond this machine (None on loopback)."""
    if is_loopback(host):
        return None
    where = ("every network interface of this machine" if host.strip() in ("0.0.0.0", "::", "[::]", "")
             else f"the interface of {host}")
    who = ("anyone who can reach it and knows the --auth password" if auth
           else "anyone who can reach it, with no login (give --auth USER:PASSWORD or put an authenticating proxy in front)")
    return (f"warning: dit-attn app listens on {host}:{port}, {where}. {who} can run generations on this machine's "
            f"CPU/GPU with the models {', '.join(registry.choices)}, upload files of up to {MAX_UPLOAD_BYTES // 2**20} MB "
            "and download the images the app made. Use --host 127.0.0.1 to serve this machine only.")


def create_app(registry: ModelRegistry, *, output_dir: str | None = None, concurrency: int = 1, max_queue: int = 16) -> gr.Blocks:
    """The page with a queue: `concurrency` generations at once, at most `max_queue` waiting."""
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError(f"concurrency must be an integer >= 1, got {concurrency!r}")
    if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
        raise ValueError(f"max queue size must be an integer >= 1, got {max_queue!r}")
    blocks = build_blocks(registry, _output_dir(output_dir))
    return blocks.queue(default_concurrency_limit=concurrency, max_size=max_queue)


def serve(registry: ModelRegistry, *, host: str = "127.0.0.1", port: int = 7860, concurrency: int = 1, max_queue: int = 16,
          output_dir: str | None = None, block: bool = True, auth: tuple[str, str] | str | None = None) -> gr.Blocks:
    """Launch the app; with block=False return once the server is up (the caller closes it with `.close()`).

    auth: (user, password) or 'USER:PASSWORD' for Gradio's login page; None reads DIT_ATTN_APP_AUTH (unset: no login).
    Uploads are capped at limits.MAX_UPLOAD_BYTES. A host other than loopback prints a warning naming what it exposes.
    """
    if auth is None or isinstance(auth, str):
        auth = parse_auth(os.environ.get(AUTH_ENV) if auth is None else auth)
    output_dir = _output_dir(output_dir)
    app = create_app(registry, output_dir=output_dir, concurrency=concurrency, max_queue=max_queue)
    warning = exposure_warning(host, port, registry, auth)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    # The images the handlers return are served from output_dir; no other path is opened up.
    app.launch(server_name=host, server_port=port, prevent_thread_lock=not block, show_error=False, quiet=not block,
               allowed_paths=[output_dir], css=CSS, max_file_size=MAX_UPLOAD_BYTES, auth=auth)
    return app

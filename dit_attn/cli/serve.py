"""`dit-attn app`: serve the web app."""
from __future__ import annotations

from .common import DTYPES


def cmd_app(args) -> int:
    try:
        from ..app import ModelRegistry, serve
        from ..app.server import parse_auth
    except ImportError as err:
        raise ValueError(f"the web app needs gradio: pip install -e \".[app]\" ({err})") from err

    auth = parse_auth(args.auth) if args.auth is not None else None  # checked before any model loads
    registry = ModelRegistry(args.model_dirs, device=args.device, dtype=args.dtype)
    serve(registry, host=args.host, port=args.port, concurrency=args.concurrency, max_queue=args.max_queue, auth=auth)
    return 0


def add_commands(sub) -> None:
    app = sub.add_parser("app", help="serve the web app (Gradio) on this machine")
    app.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default: this machine only; any other prints what it exposes)")
    app.add_argument("--port", type=int, default=7860)
    app.add_argument("--model-dir", dest="model_dirs", action="append", default=[], metavar="DIR",
                     help="a diffusers pipeline directory the page may offer (repeatable); the embedded models are always offered")
    app.add_argument("--concurrency", type=int, default=1, help="generations running at once")
    app.add_argument("--max-queue", type=int, default=16, help="requests that may wait; more are refused")
    app.add_argument("--dtype", default="float32", choices=DTYPES)
    app.add_argument("--device", default=None, help="e.g. cuda; default: where the pipeline loads")
    app.add_argument("--auth", default=None, metavar="USER:PASSWORD",
                     help="ask for this login (Gradio's login page); default: the DIT_ATTN_APP_AUTH variable, else no "
                          "login. The variable keeps the password out of the process list")
    app.set_defaults(func=cmd_app)

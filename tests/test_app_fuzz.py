"""A bounded fuzz of the web app's API through gradio_client: random and hostile values for every parameter of every
public endpoint. Each call either succeeds or returns a readable error message (never Gradio's generic one, never an
internal error), the server answers a plain request afterwards, and its memory stays below a bound.

The server runs in this process (as in test_app.py), so its memory is this process's resident set: sampled from
/proc/self/status (VmRSS) by a thread, and VmHWM after resetting it (/proc/self/clear_refs) where the kernel allows.
Seeded, so a failure replays: DIT_ATTN_FUZZ_SEED, DIT_ATTN_FUZZ_CALLS and DIT_ATTN_FUZZ_SECONDS change the run.
"""
import base64
import io
import json
import os
import random
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from gradio_client.utils import QueueError
from PIL import Image

from dit_attn.app import ModelRegistry, serve

SEED = int(os.environ.get("DIT_ATTN_FUZZ_SEED", "0"))
CALLS = int(os.environ.get("DIT_ATTN_FUZZ_CALLS", "300"))
SECONDS = float(os.environ.get("DIT_ATTN_FUZZ_SECONDS", "40"))
MIN_CALLS = 100  # a run cut short by its time bound still makes at least this many calls
MEMORY_BOUND = 512 * 2**20  # bytes the server may grow above its resident set before the run (measured: ~65 MiB)
GENERIC = "has not enabled verbose error reporting"  # Gradio's message for an exception it was not told about
INTERNAL = "internal error"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


class PeakMemory:
    """The largest resident set of this process while the block runs (bytes): VmRSS sampled every 10 ms, and VmHWM
    when the kernel lets us reset it at the start."""

    def __init__(self):
        self.start = self.peak = status_kib("VmRSS") * 1024
        self._stop = threading.Event()

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set
            self._hwm = True
        except OSError:
            self._hwm = False
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, status_kib("VmRSS") * 1024)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        if self._hwm:
            self.peak = max(self.peak, status_kib("VmHWM") * 1024)

    @property
    def growth(self) -> int:
        return self.peak - self.start


# files a hostile user uploads


def png_bytes(width: int, height: int, color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A valid-looking PNG whose header claims width × height pixels (decoding it would allocate them all)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def atlas_json(layers=(4, 4, 4, 4), thumbnail: bytes | None = None, **changes) -> str:
    thumb = base64.b64encode(thumbnail if thumbnail is not None else png_bytes(48, 48)).decode()
    scores = {"L0H0": 0.5, "L1H2": 0.25}
    data = {"baseline": 0.3, "scores": scores, "thumbnails": {**{h: thumb for h in scores}, "baseline": thumb},
            "layers": list(layers), "settings": {"objective": "color:red", "u": 1.0, "scale": 3.0}}
    return json.dumps({**data, **changes})


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz-files")

    def write(name: str, content) -> str:
        path = folder / name
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
        return str(path)

    return {
        "png": write("ref.png", png_bytes(24, 16)),
        "tiny_png": write("one.png", png_bytes(1, 1)),
        "bomb_png": write("bomb.png", png_claiming(60000, 60000)),
        "wide_png": write("wide.png", png_claiming(5000, 5000)),
        "text": write("notes.png", "this is not an image"),
        "empty": write("empty.json", b""),
        "garbage": write("garbage.bin", os.urandom(200_000)),
        "atlas": write("atlas.json", atlas_json()),
        "atlas_layers": write("layers.json", atlas_json(layers=[64] * 5000)),
        "atlas_heads": write("heads.json", atlas_json(layers=[10**9])),
        "atlas_big_thumb": write("thumb.json", atlas_json(thumbnail=png_bytes(300, 300))),
        "atlas_bomb_thumb": write("bomb.json", atlas_json(thumbnail=png_claiming(60000, 60000))),
        "atlas_script": write("script.json", atlas_json(settings={"objective": "<script>alert(1)</script>",
                                                                "u": "<img src=x onerror=alert(1)>", "scale": 3})),
        "atlas_values": write("values.json", '{"scores": {' + ",".join(f'"k{i}":0' for i in range(250_000)) + "}}"),
        "atlas_deep": write("deep.json", "[" * 100_000 + "]" * 100_000),
        "atlas_nan": write("nan.json", atlas_json(baseline=float("nan"))),
        "atlas_map_nan": write("map_nan.json", atlas_json(maps={"L0H0": [[float("nan")]]}, maps_word="red")),
        "atlas_map_big": write("map_big.json", atlas_json(maps={"L0H0": [[0.0] * 40] * 40}, maps_word="red")),
        "atlas_map_ragged": write("map_ragged.json", atlas_json(maps={"L0H0": [[0.0], [0.0, 1.0]]}, maps_word="red")),
        "atlas_map_script": write("map_script.json", atlas_json(maps={"L0H0": [[0.5]]}, maps_word="<script>x</script>")),
        "atlas_bigint": write("bigint.json", atlas_json().replace('"baseline": 0.3', '"baseline": ' + "9" * 5000)),
        "wan": wan_model(folder / "wan"),  # a video model the server offers (--model-dir)
    }


def wan_model(path) -> str:
    from dit_attn.toy.wan import build_wan_pipeline

    build_wan_pipeline().save_pretrained(path)
    return str(path)


# the values: small valid ones (cheap to run) and hostile ones, per kind of parameter

HOSTILE_ANY = [None, "", " ", -1, 0, 2**64, -(2**63), 1e308, -1e308, float("nan"), float("inf"), True, [], {}, ["x"],
               "\x00", "<script>alert(1)</script>", "../../../../etc/passwd", "A" * 20_000, "💥" * 50, "1e999",
               "9" * 5000, {"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}]
HOSTILE_NUMBER = [-1, -0.5, 1001, 10**9, 2**63, 2**80, 1e308, 1.5, float("nan"), float("inf"), -float("inf"), True, None,
                  "3", "many"]
HOSTILE_SIZE = ["0", "3", "30", "16000x8000", "100000x100000", "4096", "256x260", "-32", "32x", "x32", "32x32x32",
                "9" * 60, "1e3", "32 x 32", "３２"]


def valid(kind: str, rng: random.Random, files: dict):
    """A small valid value of a parameter (a generation with it takes well under a second on the demo model)."""
    return {
        "model": lambda: rng.choice(["demo", "demo", "demo", files["wan"]]),
        "prompt": lambda: rng.choice(["a red circle", "a blue square on a white background", "x"]),
        "steps": lambda: rng.choice([1, 2]),
        "cfg": lambda: rng.choice([0.0, 1.0, 4.5, 7]),
        "seed": lambda: rng.choice([0, 3, 2**63 - 1]),
        "size": lambda: rng.choice(["", "32", "16", "16x32", "8"]),
        "heads": lambda: rng.choice(["", "L1H0", "L0, L2H3", "L3"]),
        "picked": lambda: rng.choice([[], ["L0H1"], ["L2H0", "L3H3"]]),
        "presets": lambda: [],
        "u": lambda: rng.choice([0.0, 0.5, 1.0]),
        "scope": lambda: rng.choice(["joint", "image"]),
        "target": lambda: rng.choice(["identity", "uniform"]),
        "pag_scale": lambda: rng.choice([0.0, 2.0, 20.0]),
        "local_radius": lambda: rng.choice([None, 0, 1.5, 3]),
        "start": lambda: rng.choice([0.0, 0.25]),
        "end": lambda: rng.choice([0.75, 1.0]),
        "local_downsample": lambda: None,
        "nag_negative": lambda: rng.choice(["", "", "red"]),
        "nag_scale": lambda: rng.choice([1.0, 5.0]),
        "frames": lambda: rng.choice([None, 5, 9]),  # a video model's; image models ignore them
        "fps": lambda: rng.choice([None, 8, 24.5]),
        "layout": lambda: rng.choice(["1x2", "2x1", "1x3"]),
        "panels": None,  # made to match the layout
        "task": lambda: rng.choice(["SET", ""]),
        "summary": lambda: rng.choice(["", "two panels of the same circle"]),
        "reference": lambda: rng.choice([None, handle_file(files["png"]), handle_file(files["tiny_png"])]),
        "reference_panel": lambda: rng.choice([0, 1]),
        "objective": lambda: rng.choice(["color:purple", "judge", "color:red"]),
        "prompts": lambda: rng.choice(["a red circle on a white background", "a red circle"]),
        "seeds": lambda: rng.choice(["0", "0 1", "3"]),
        "atlas_steps": lambda: 1,
        "upload": lambda: handle_file(files["atlas"]),
        "sign_prompt": lambda: rng.choice(['a sign that says "A" in red on a white background', 'a sign that says "B"']),
        "new_text": lambda: rng.choice(["B", "C"]),
        "text_layers": lambda: rng.choice(["1", "0,3", ""]),
        "text_start": lambda: rng.choice([0.0, 0.5]),
        "blocklist": lambda: rng.choice(["", "A", "a, X"]),
        "maps_word": lambda: rng.choice(["", "", "red"]),
        "maps_kind": lambda: rng.choice(["cross", "cross", "self", "concept"]),
        "maps_words": lambda: rng.choice(["red", "red, circle", ""]),
        "maps_layers": lambda: rng.choice(["", "0", "1,3"]),
        "maps_heads": lambda: rng.choice(["", "0", "1,2"]),
        "maps_first": lambda: rng.choice([None, 0]),
        "maps_last": lambda: rng.choice([None, 1]),
        "maps_per_layer": lambda: rng.choice([True, False]),
    }[kind]()


def hostile(kind: str, rng: random.Random, files: dict):
    pools = {
        "model": ["tiny-but-not-offered", "/etc", "../demo", "DEMO"],
        "steps": HOSTILE_NUMBER, "cfg": HOSTILE_NUMBER, "seed": HOSTILE_NUMBER + [-(2**63), 2**63],
        "u": HOSTILE_NUMBER, "pag_scale": HOSTILE_NUMBER, "local_radius": HOSTILE_NUMBER, "start": HOSTILE_NUMBER,
        "end": HOSTILE_NUMBER, "local_downsample": HOSTILE_NUMBER, "reference_panel": HOSTILE_NUMBER,
        "nag_scale": HOSTILE_NUMBER, "frames": HOSTILE_NUMBER + [6, 10**6], "fps": HOSTILE_NUMBER + [0, 1000],
        "nag_negative": ["x" * 5000, " ", "\x00"],
        "atlas_steps": HOSTILE_NUMBER, "text_start": HOSTILE_NUMBER,
        "size": HOSTILE_SIZE,
        "heads": ["L99H0", "L0H99", "head7", "L-1H0", ",,,", "L" + "9" * 5000, "sd3:nothing", "L0H0," * 3000],
        "picked": [["L99H99"], ["L0H0"] * 5000, "L0H0", [None], [1, 2], [["L0H0"]]],
        "presets": [["sd3:dark"], ["flux:none"], "sd3:dark", [None]],
        "scope": ["everything", "JOINT"], "target": ["zero", "IDENTITY"],
        "layout": ["100000x100000", "0x2", "1x1", "5x5", "axb", "1x2x3", "-1x2", "1 x 200"],
        "panels": ["", "\n\n", "one line only", "a\nb\nc\nd\ne", "x\n" * 5000],
        "objective": ["aesthetic:/etc/passwd", "pickscore:../../x", "color:", "judge:nothing"],
        "prompts": ["\n".join(["a red circle"] * 9), "a cat on the moon", " \n ", "p\n" * 5000],
        "seeds": ["0 x", "0 1 2 3 4", "-1", "1e3", "0," * 3000, "99999999999999999999999"],
        "reference": [handle_file(files[k]) for k in ("bomb_png", "wide_png", "text", "empty", "garbage")],
        "upload": [None, *(handle_file(files[k]) for k in ("text", "empty", "garbage", "png", "atlas_layers", "atlas_heads",
                                                           "atlas_big_thumb", "atlas_bomb_thumb", "atlas_script",
                                                           "atlas_values", "atlas_deep", "atlas_nan", "atlas_bigint",
                                                           "atlas_map_nan", "atlas_map_big", "atlas_map_ragged",
                                                           "atlas_map_script"))],
        "sign_prompt": ["a sign", "no quotes at all", 'a sign that says ""', 'a sign that says "' + "A" * 5000 + '"'],
        "new_text": ["", " ", '"', "B" * 5000],
        "text_layers": ["9", "two", "-1", "0+1+2+3+4", "1," * 3000],
        "blocklist": ['"A"', ",,,", "w," * 3000],
        "maps_word": ["dog", "red circle", "w" * 5000, ","],
        "maps_kind": ["everything", "CROSS", ["cross"]],
        "maps_words": ["dog", "4,4;0,7", "9,9", ",,,", "red," * 3000, "w" * 5000],
        "maps_layers": ["99", "-1", "two", "1," * 3000, "9" * 5000],
        "maps_heads": ["99", "-1", "x", "0," * 3000],
        "maps_first": HOSTILE_NUMBER, "maps_last": HOSTILE_NUMBER,
        "maps_per_layer": ["yes", 2, [True]],
    }
    pool = pools.get(kind, []) + HOSTILE_ANY
    return rng.choice(pool)


ENDPOINTS = {
    "/generate": ["model", "prompt", "steps", "cfg", "seed", "size", "heads", "picked", "presets", "u", "scope", "target",
                  "pag_scale", "local_radius", "start", "end", "local_downsample", "nag_negative", "nag_scale", "frames", "fps"],
    "/compare": ["model", "prompt", "steps", "cfg", "seed", "size", "heads", "picked", "presets", "u", "scope", "target",
                 "pag_scale", "local_radius", "start", "end", "local_downsample", "nag_negative", "nag_scale", "frames", "fps"],
    "/sets": ["model", "steps", "cfg", "seed", "size", "layout", "panels", "task", "summary", "reference",
              "reference_panel"],
    "/atlas": ["model", "objective", "prompts", "seeds", "atlas_steps", "u", "pag_scale", "cfg", "size", "scope",
               "target", "maps_word"],
    "/load_atlas": ["upload"],
    "/maps": ["model", "prompt", "steps", "cfg", "seed", "size", "heads", "picked", "presets", "u", "scope", "target",
              "pag_scale", "local_radius", "start", "end", "local_downsample", "nag_negative", "nag_scale", "frames", "fps",
              "maps_kind",
              "maps_words", "maps_layers", "maps_heads", "maps_first", "maps_last", "maps_per_layer"],
    "/text_edit": ["model", "steps", "cfg", "seed", "size", "sign_prompt", "new_text", "text_layers", "text_start",
                   "blocklist"],
}


def make_call(rng: random.Random, files: dict) -> tuple[str, list]:
    """An endpoint and its arguments: a valid small form with one or two hostile values (most calls), every value
    random (some), or all valid (a few, so the success paths run too)."""
    endpoint = rng.choice(sorted(ENDPOINTS))
    kinds = ENDPOINTS[endpoint]
    mode = rng.random()
    values = {kind: valid(kind, rng, files) if kind != "panels" else None for kind in kinds}
    if "panels" in values:
        rows, cols = map(int, values["layout"].split("x"))
        values["panels"] = "\n".join(f"a red circle {k}" for k in range(rows * cols))
    if values.get("maps_kind") == "self":
        values["maps_words"] = "0,0; 3,4"  # cells of the smallest grid
    if values.get("size") and endpoint == "/sets":
        values["size"] = ""  # the default canvas always splits into whole-token panels
    if mode < 0.65:
        for kind in rng.sample(kinds, min(len(kinds), rng.choice([1, 1, 2]))):
            values[kind] = hostile(kind, rng, files)
    elif mode < 0.9:
        for kind in kinds:
            if rng.random() < 0.5:
                values[kind] = hostile(kind, rng, files)
    return endpoint, [values[kind] for kind in kinds]


def finite(value) -> bool:
    """Whether `value` can travel as standard JSON (gradio_client refuses NaN and infinities before sending)."""
    if isinstance(value, float):
        return value == value and abs(value) != float("inf")
    if isinstance(value, (list, tuple)):
        return all(finite(v) for v in value)
    if isinstance(value, dict):
        return all(finite(v) for v in value.values())
    return True


def names_server_path(value) -> bool:
    """A FileData naming a file on the server that was never uploaded: Gradio itself refuses it (InvalidPathError,
    its generic message), before any handler of ours runs."""
    return isinstance(value, dict) and value.get("meta") == {"_type": "gradio.FileData"} and "url" not in value


def raw_call(base_url: str, endpoint: str, args: list) -> tuple[bool, str | None]:
    """POST the arguments as JSON text (NaN and Infinity included, as a hand-written client may send them) and read
    the event stream: (completed, error message or None)."""
    args = [None if isinstance(a, dict) and a.get("meta") else a for a in args]  # files cannot be uploaded this way
    url = f"{base_url.rstrip('/')}/gradio_api/call{endpoint}"
    body = json.dumps({"data": args})  # allow_nan: NaN, Infinity
    response = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=60)
    if response.status_code != 200:
        return False, f"HTTP {response.status_code}: {response.text[:200]}"
    stream = httpx.get(f"{url}/{response.json()['event_id']}", timeout=120).text
    if "event: complete" in stream:
        return True, None
    data = stream.split("event: error", 1)[-1].partition("data:")[2].strip().splitlines()[0] if "event: error" in stream else ""
    message = json.loads(data) if data else None  # {"error": message, ...}; null for Gradio's generic error
    if isinstance(message, dict):
        message = message.get("error")
    return False, message if isinstance(message, str) else None


def short(args) -> str:
    return repr([a if not isinstance(a, str) or len(a) < 60 else a[:40] + f"...({len(a)} chars)" for a in args])[:600]


@pytest.fixture(scope="module")
def server(tmp_path_factory, files):
    registry = ModelRegistry([files["wan"]], embedded=("demo",))
    app = serve(registry, port=free_port(), output_dir=str(tmp_path_factory.mktemp("fuzz-out")), block=False)
    budget = os.environ.get("DIT_ATTN_MAX_VIDEO_PIXELS")
    os.environ["DIT_ATTN_MAX_VIDEO_PIXELS"] = str(9 * 32 * 32)  # every video the fuzzer may ask for stays tiny
    yield app
    app.close()
    if budget is None:
        del os.environ["DIT_ATTN_MAX_VIDEO_PIXELS"]
    else:
        os.environ["DIT_ATTN_MAX_VIDEO_PIXELS"] = budget


@pytest.fixture(scope="module")
def client(server):
    return Client(server.local_url, verbose=False, analytics_enabled=False, download_files=False)


PLAIN = ["demo", "a red circle", 2, 4.5, 3, "32", "", [], [], 0.5, "joint", "identity", 2.0, None, 0.0, 1.0, None, "", 5.0,
         None, None]


def test_fuzz_every_endpoint_answers_or_refuses_readably(server, client, files):
    rng = random.Random(SEED)
    client.predict(*PLAIN, api_name="/generate")  # the model is loaded before memory is measured
    outcomes = {endpoint: {"ok": 0, "refused": 0} for endpoint in ENDPOINTS}
    bad = []
    deadline = time.monotonic() + SECONDS
    with PeakMemory() as memory:
        for n in range(CALLS):
            if n >= MIN_CALLS and time.monotonic() > deadline:
                break
            endpoint, args = make_call(rng, files)
            try:
                if finite(args):
                    client.predict(*args, api_name=endpoint)
                    ok, message = True, None
                else:
                    ok, message = raw_call(server.local_url, endpoint, args)
            except AppError as err:
                ok, message = False, str(err)
            except Exception as err:  # the client could not even get an answer
                bad.append(f"{endpoint} {short(args)} -> {type(err).__name__}: {str(err)[:300]}")
                continue
            outcomes[endpoint]["ok" if ok else "refused"] += 1
            if not ok and (message is None or GENERIC in message or INTERNAL in message or not message.strip()):
                if not any(names_server_path(a) for a in args):
                    bad.append(f"{endpoint} {short(args)} -> {message and message[:300]}")
    calls = sum(sum(o.values()) for o in outcomes.values())
    print(f"\nfuzz: {calls} calls, seed {SEED}: {outcomes}; peak RSS {memory.peak / 2**20:.0f} MiB "
          f"(+{memory.growth / 2**20:.0f} MiB over {memory.start / 2**20:.0f} MiB)")
    assert not bad, f"{len(bad)} calls got no readable answer:\n" + "\n".join(bad[:20])
    assert calls >= MIN_CALLS and all(o["refused"] for o in outcomes.values())
    assert sum(o["ok"] for o in outcomes.values()) >= 10  # the success paths ran too
    assert memory.growth < MEMORY_BOUND, f"the server grew by {memory.growth / 2**20:.0f} MiB"
    path, settings = client.predict(*PLAIN, api_name="/generate")  # still serving, and correctly
    assert settings["seed"] == 3 and settings["height"] == 32


def test_twenty_concurrent_requests_complete_or_are_refused_by_the_queue(server, client):
    """20 requests at once against a queue of 16 (one generation at a time): each completes or is refused as
    'Queue is full'; none is lost or fails otherwise, memory stays bounded, and the server serves the next request."""
    client.predict(*PLAIN, api_name="/generate")
    done, refused, other = 0, 0, []
    with PeakMemory() as memory, ThreadPoolExecutor(20) as pool:
        jobs = [pool.submit(client.predict, *PLAIN[:4], k, *PLAIN[5:], api_name="/generate") for k in range(20)]
        for job in jobs:
            try:
                job.result(timeout=120)
                done += 1
            except QueueError as err:  # gradio_client's exception for the queue's refusal
                assert "queue is full" in str(err).lower()
                refused += 1
            except Exception as err:
                other.append(f"{type(err).__name__}: {err}")
    print(f"\n20 concurrent: {done} done, {refused} refused (queue full); peak RSS {memory.peak / 2**20:.0f} MiB "
          f"(+{memory.growth / 2**20:.0f} MiB)")
    assert not other and done + refused == 20 and done >= 16
    assert memory.growth < MEMORY_BOUND
    assert client.predict(*PLAIN, api_name="/generate")[1]["seed"] == 3

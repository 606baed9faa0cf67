"""Stage (d): the Triton self-check's verdict for each kernel configuration the benchmarks and
the pipelines use (dense SoftPAG in both scopes, local windows with and without pooled keys,
the backward), per head dim and half-precision dtype. Each check runs afresh (this run's
stored self-check failures are dropped first, so later stages check again too)."""
from __future__ import annotations

import json
import os
import time

import report

SOFTPAG = [(("joint/identity",), "text first"), (("image/identity",), "text first"), (("image/identity",), "image first"),
           (("image/uniform", "joint/identity"), "text first")]
LOCAL = [((), False), (("joint/uniform",), False), (("image/identity",), True)]
BACKWARD = [(("joint/identity",), "dense", False), ((), "local", False), (("image/uniform",), "local", True)]


def configurations(device: str, dry_run: bool) -> list[tuple]:
    dims, dtypes = ((16,), ("float32", "float16")) if dry_run else ((64, 128), ("bfloat16", "float16"))
    configs = []
    for dim in dims:
        for dtype in dtypes:
            configs += [("softpag", dim, dtype, blends, "dense", False, layout, device) for blends, layout in SOFTPAG]
            configs += [("local", dim, dtype, blends, "local", pooled, "text first", device) for blends, pooled in LOCAL]
            configs += [("backward", dim, dtype, blends, window, pooled, "text first", device)
                        for blends, window, pooled in BACKWARD]
    return configs


def drop_stored_failures() -> int:
    from dit_attn.kernels import selfcheck
    from dit_attn.kernels.triton import tuning

    path = tuning.cache_path()
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return 0
    kept = {key: value for key, value in data.items() if not key.startswith(selfcheck.CACHE_PREFIX)}
    with open(path, "w") as f:
        json.dump(kept, f, indent=1, sort_keys=True)
    return len(data) - len(kept)


def main() -> None:
    args = report.arguments(__doc__.split("\n")[0])
    device = report.device(args.dry_run)
    from dit_attn.kernels import selfcheck

    out = report.Report(args.out, "selfcheck", "Triton self-check verdicts", args.dry_run)
    dropped = drop_stored_failures()
    out.note(f"tolerances (max error relative to max(|reference|, 1)): {selfcheck.TOLERANCES}; "
             f"{dropped} stored failure(s) of an earlier run dropped")
    section = "verdicts"
    out.section(section, ["configuration", "verdict", "s"])
    failed = 0
    for config in configurations(device, args.dry_run):
        start = time.perf_counter()
        try:
            error = selfcheck.check(selfcheck.Configuration(*config))
        except Exception as err:  # the reference or the input itself failed: report, go on
            error = f"check crashed: {type(err).__name__}: {err}"
        failed += error is not None
        out.add(section, {"configuration": selfcheck.Configuration(*config).describe(), "verdict": error or "pass",
                          "s": round(time.perf_counter() - start, 2)})
        print(f"  {out.data['sections'][section]['rows'][-1]}", flush=True)
    out.note(f"{failed} of {len(out.data['sections'][section]['rows'])} configurations failed")
    print(f"selfcheck: {failed} failed, cache {os.environ.get('DIT_ATTN_CACHE', '~/.cache/dit_attn')}")


if __name__ == "__main__":
    main()

"""Writing one video in each format dit-attn offers: time, size and fidelity, side by side in one run.

The frames are smooth moving colour waves with a little noise (closer to generated video than noise alone),
written by `dit_attn.video.write_video_atomic` and decoded back with `read_video_frames`.

    python benchmarks/video_formats.py --frames 33 --size 832x480
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from dit_attn import video
from dit_attn.io import parse_size


def moving_waves(frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    t, y, x = np.arange(frames)[:, None, None], np.arange(height)[None, :, None], np.arange(width)[None, None, :]
    channels = [128 + 100 * np.sin((x + 4 * t) / 40 + y / 60), 128 + 100 * np.cos((y - 3 * t) / 50),
                128 + 80 * np.sin((x + y + 5 * t) / 70)]
    waves = np.stack([np.broadcast_to(c, (frames, height, width)) for c in channels], -1)
    return np.clip(waves + np.random.default_rng(seed).normal(0, 6, waves.shape), 0, 255).astype(np.uint8)


def psnr(a, b, luma: bool = False) -> float:
    a, b = np.stack(a).astype(np.float64), np.stack(b).astype(np.float64)
    if luma:
        a, b = a @ [0.299, 0.587, 0.114], b @ [0.299, 0.587, 0.114]
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument("--size", default="832x480", help="WIDTHxHEIGHT")
    args = parser.parse_args()
    height, width = parse_size(args.size)
    frames = moving_waves(args.frames, height, width)
    formats = [f for f in video.VIDEO_FORMATS if f != "mp4" or video.mp4_available()]
    print(f"{args.frames} frames of {width}x{height} ({frames.nbytes / 2**20:.1f} MiB raw), threads: {os.cpu_count()} CPUs")
    print(f"{'format':<7}{'write s':>9}{'MiB':>8}{'PSNR dB':>9}{'luma dB':>9}")
    with tempfile.TemporaryDirectory() as folder:
        for video_format in formats:
            path = os.path.join(folder, f"v.{video_format}")
            start = time.perf_counter()
            video.write_video_atomic(frames, path, {}, fps=16, video_format=video_format)
            seconds = time.perf_counter() - start
            back = video.read_video_frames(path)
            print(f"{video_format:<7}{seconds:>9.2f}{os.path.getsize(path) / 2**20:>8.2f}{psnr(back, frames):>9.1f}"
                  f"{psnr(back, frames, luma=True):>9.1f}")


if __name__ == "__main__":
    main()

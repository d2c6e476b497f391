"""Soak test of the camera stream: N frames (default 10,000) from a looped video of demo scenes, with the demo model.

    python samples/soak_camera.py [--frames 10000] [--latest-only] [--export demo]

Reports frames read, processed and dropped per second, and the resident memory (RSS) after a warm-up and at the end:
the stream's caches are bounded, so memory must stay flat. Not a test (it takes minutes); its figures go into the
issue notes and docs/camera.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from flamingo_edge.demo import scenes
from flamingo_edge.demo.bundle import resolve_export
from flamingo_edge.runtime.pipeline import Pipeline
from flamingo_edge.runtime.sources import open_source
from flamingo_edge.runtime.stream import FrameStream


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=10_000)
    parser.add_argument("--warmup", type=int, default=1_000, help="frames before the first memory reading")
    parser.add_argument("--latest-only", action="store_true", help="drop frames as a live camera would")
    parser.add_argument("--export", default="demo")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as scratch, Pipeline.open(resolve_export(args.export)) as pipeline:
        video = Path(scratch) / "loop.mp4"
        writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10, (192, 192))
        for _ in range(100):  # 100 scenes, 2 frames each, looped
            image = cv2.resize(scenes.make_scene(rng).image, (192, 192), interpolation=cv2.INTER_NEAREST)
            for _ in range(2):
                writer.write(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        writer.release()
        readings, source = {}, open_source(str(video), loop=True)

        def on_frame(frame) -> None:
            if frame.index + 1 in (args.warmup, args.frames):
                readings[frame.index + 1] = rss_bytes()
            if frame.index + 1 >= args.frames:
                stream.stop_reading()

        stream = FrameStream(pipeline, source, prompts=["caption:"], max_new_tokens=12,
                             latest_only=args.latest_only, on_frame=on_frame)
        start = time.perf_counter()
        processed = sum(1 for _ in stream)
        seconds = time.perf_counter() - start
    counts = stream.stats.counts
    growth = readings[args.frames] / readings[args.warmup] - 1
    print(json.dumps({
        "frames_read": counts["read"], "processed": processed, "dropped": counts["dropped"],
        "reused": counts["reused"], "seconds": round(seconds, 1),
        "read_per_s": round(counts["read"] / seconds, 1), "processed_per_s": round(processed / seconds, 1),
        "dropped_per_s": round(counts["dropped"] / seconds, 1),
        "rss_mib_after_warmup": round(readings[args.warmup] / 2**20, 1),
        "rss_mib_at_end": round(readings[args.frames] / 2**20, 1), "rss_growth": f"{growth:+.2%}",
        "latest_only": args.latest_only,
    }, indent=2))


if __name__ == "__main__":
    main()

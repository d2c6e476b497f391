"""Several sources at once through one decode batch (`MultiStream`, `camera_app.py SRC1 SRC2`): a video file and a
live HTTP stream served by ffmpeg on loopback, every caption equal to the caption of the same frame alone, and the
live server stopped and restarted mid-run."""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict

import numpy as np

from flamingo_edge.runtime.pipeline import Pipeline
from flamingo_edge.runtime.sources import open_source
from flamingo_edge.runtime.stream import MultiStream
from livestream import LoopbackStream, make_clip
from test_camera_app import run_app, write_video


def test_the_app_with_two_videos_gives_each_the_captions_of_its_single_source_run(tmp_path, seed, demo_export):
    rng = np.random.default_rng(seed)
    videos = [tmp_path / "a.mp4", tmp_path / "b.mp4"]
    for video, scenes_n in zip(videos, (5, 4)):
        write_video(video, rng, scenes_n=scenes_n, hold=2)
    single = {}
    for video in videos:
        result = run_app(str(video), "--export", str(demo_export), "--headless")
        assert result.returncode == 0, result.stderr
        single[str(video)] = [json.loads(line)["text"] for line in result.stdout.splitlines()]
    both = run_app(*map(str, videos), "--export", str(demo_export), "--headless")
    assert both.returncode == 0, both.stderr
    got = defaultdict(dict)
    for line in both.stdout.splitlines():
        row = json.loads(line)
        got[row["source"]][row["frame"]] = row["text"]
    for video, texts in single.items():
        assert [got[video][frame] for frame in range(len(texts))] == texts  # a file: every frame, in order
    assert "frames per step on average" in both.stderr and "processed 10" in both.stderr


def test_a_video_and_a_live_stream_at_once_survive_the_live_server_restarting(tmp_path, seed, demo_export):
    rng = np.random.default_rng(seed)
    video = tmp_path / "scenes.mp4"
    write_video(video, rng, scenes_n=6, hold=2)
    clip = tmp_path / "clip.mp4"
    make_clip(clip, frames=25, size=96, fps=25, seed=int(rng.integers(1 << 30)))
    frames, results, lock = defaultdict(dict), defaultdict(list), threading.Lock()
    restarted_at = restart_frame = None  # when the live server came back, and the last frame read before
    with LoopbackStream(clip) as server, Pipeline.open(demo_export) as pipeline:
        sources = [open_source(str(video), loop=True), open_source(server.url, retries=8, backoff_s=0.25)]
        assert sources[1].live and not sources[0].live
        multi = MultiStream(pipeline, sources, prompts=["caption:"], max_new_tokens=12)
        for stream in multi.streams:  # keep every frame read, to caption the processed ones alone afterwards
            def keep(frame, uri=stream.source.uri):
                with lock:
                    frames[uri][frame.index] = frame.image
            stream.on_frame = keep
        live, deadline = sources[1].uri, time.monotonic() + 120
        with multi:
            for result in multi:
                results[result.source].append(result)
                after_restart = [r for r in results[live] if restarted_at and r.frame > restart_frame]
                if restarted_at is None and len(results[live]) >= 3:
                    server.stop()  # the live server goes away mid-stream...
                    time.sleep(0.5)
                    server.start()  # ...and comes back
                    restarted_at, restart_frame = time.monotonic(), max(frames[live])
                elif restarted_at and len(after_restart) >= 3 and len(results[str(video)]) >= 24:
                    break
                assert time.monotonic() < deadline, "the two sources did not both produce results in time"
        assert not multi.errors, multi.errors
        assert sources[1].reconnects >= 1
        assert multi.scheduler.stats["rows_stepped"] > multi.scheduler.stats["steps"]  # frames shared decode steps
        for uri, rows in results.items():
            assert len(rows) >= 3
            for row in rows:
                alone = pipeline.complete([[frames[uri][row.frame], "caption:"]], max_new_tokens=12)[0]
                assert (row.text, row.token_ids) == (alone.text, alone.token_ids), (uri, row.frame)

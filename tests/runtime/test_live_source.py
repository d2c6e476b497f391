"""FrameSource on a real live network stream: ffmpeg serving a looping clip over HTTP on loopback (tests/livestream.py),
read by OpenCV's FFmpeg backend, with the server killed, hung or gone for good. RTSP's own handshake and teardown are
not covered: ffmpeg cannot act as an RTSP server (docs/camera.md, "Live network streams")."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from flamingo_edge.errors import SourceError
from flamingo_edge.runtime import sources
from flamingo_edge.runtime.sources import open_source
from livestream import LoopbackStream, make_clip

FPS = 25
# Mean absolute difference (0-255) of a streamed frame from its clip frame: MPEG-1 coding costs < 5 here, and any two
# frames of the clip differ by > 9.
MATCH_MAD = 8.0


@pytest.fixture(scope="module")
def clip(tmp_path_factory, seed) -> tuple[Path, list[np.ndarray]]:
    path = tmp_path_factory.mktemp("live") / "clip.mp4"
    return path, make_clip(path, frames=FPS, size=96, fps=FPS, seed=seed)


@pytest.fixture
def stream(clip):
    with LoopbackStream(clip[0], fps=FPS) as served:
        yield served


def clip_index(image: np.ndarray, frames: list[np.ndarray]) -> int:
    """The clip frame `image` is (after MPEG-1 coding), or -1 if it is like none of them."""
    errors = [np.abs(image.astype(np.float32) - frame).mean() for frame in frames]
    best = int(np.argmin(errors))
    return best if errors[best] < MATCH_MAD else -1


def read_through_a_loss(source, frames_after: int) -> list:
    """Read through a loss of the stream (the frames still buffered, then the reconnection) and `frames_after` more;
    the last `frames_after + 1` frames come from the new connection."""
    frames = []
    while not source.reconnects:
        if len(frames) > 10 * FPS:
            raise AssertionError(f"no reconnection after {len(frames)} frames")
        frames.append(source.read())
    return frames + [source.read() for _ in range(frames_after)]


def test_an_http_stream_is_live_and_delivers_the_clip_in_order_at_its_rate(stream, clip):
    with open_source(stream.url) as source:
        assert source.live and source.kind == "stream"
        frames = [source.read() for _ in range(3 * FPS)]
    assert [frame.index for frame in frames] == list(range(3 * FPS)) and source.reconnects == 0
    indices = [clip_index(frame.image, clip[1]) for frame in frames]
    assert -1 not in indices, indices
    steps = [(b - a) % FPS for a, b in zip(indices, indices[1:])]
    assert steps.count(1) >= 0.9 * len(steps), indices  # the clip in order, looping
    # Paced by the server, not read as fast as a file (ffmpeg -re sends a short burst first, hence the margin). A lower
    # bound only: a busy machine cannot fail it.
    assert frames[-1].seconds - frames[0].seconds > 0.5 * (len(frames) - 1) / FPS


def test_a_killed_server_is_reconnected_to_once_it_is_back(stream, clip, caplog):
    with open_source(stream.url, retries=6, backoff_s=0.2) as source:
        before = [source.read() for _ in range(10)]
        stream.stop()  # kills the ffmpeg serving this client; the first attempts are refused
        comeback = threading.Timer(0.5, stream.start)
        comeback.start()
        try:
            after = read_through_a_loss(source, frames_after=10)
        finally:
            comeback.join()
    assert source.reconnects == 1 and "reconnecting in 0.2 s (attempt 1 of 6)" in caplog.text
    assert [frame.index for frame in before + after] == list(range(len(before) + len(after)))
    assert -1 not in [clip_index(frame.image, clip[1]) for frame in after[-11:]]  # the clip again, from the new server


def test_a_hung_server_times_out_and_is_reconnected_to(stream, clip, monkeypatch, caplog):
    # A server that stops sending without closing: OpenCV would wait 30 s; FrameSource bounds it (here 1 s).
    monkeypatch.setattr(sources, "STREAM_READ_TIMEOUT_MS", 1000)
    with open_source(stream.url, retries=6, backoff_s=0.2) as source:
        for _ in range(10):
            source.read()
        hung, hung_at = stream.pid, time.perf_counter()
        os.kill(hung, signal.SIGSTOP)
        # Resumed, it finds its client gone and exits; LoopbackStream starts a fresh ffmpeg for the reconnection.
        resume = threading.Timer(2.0, os.kill, (hung, signal.SIGCONT))
        resume.start()
        try:
            after = read_through_a_loss(source, frames_after=5)
        finally:  # on a failure, the fixture's stop() kills the stopped ffmpeg
            resume.cancel()
            resume.join()
    assert source.reconnects == 1 and "no frame" in caplog.text
    assert -1 not in [clip_index(frame.image, clip[1]) for frame in after[-6:]]
    assert after[-6].seconds - hung_at < 15  # well under the 30 s OpenCV waits by default


def test_a_server_gone_for_good_raises_source_error_after_the_retries(stream, caplog):
    source = open_source(stream.url, retries=2, backoff_s=0.1)
    for _ in range(5):
        source.read()
    stream.stop()
    with pytest.raises(SourceError, match=r"lost after \d+ frames; 2 reconnection attempts failed"):
        for _ in range(10 * FPS):  # the frames already buffered, then the loss
            source.read()
    assert source.end_reason.startswith("lost after") and source.read() is None
    assert caplog.text.count("reconnecting in") == 2

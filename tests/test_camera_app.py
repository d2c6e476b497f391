"""samples/camera_app.py and the streaming runtime under it, on real videos written with OpenCV from demo scenes and
the bundled demo checkpoint: captions against the scenes' ground truth, the overlaid output video, sources that end
early or never existed, a live source that is lost, dropped frames, few-shot preambles and rotating prompts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from flamingo_edge.demo import scenes
from flamingo_edge.errors import FeatureUnavailableError, SourceError
from flamingo_edge.runtime.pipeline import Pipeline
from flamingo_edge.runtime.sources import open_source
from flamingo_edge.runtime.stream import FrameStream

ROOT = Path(__file__).parents[1]
APP = ROOT / "samples" / "camera_app.py"


def write_video(path: Path, rng, *, scenes_n: int, hold: int, fourcc: str = "mp4v", size: int = 192) -> list[str]:
    """A video of demo scenes, each held for `hold` frames; returns the caption of every frame."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 10, (size, size))
    truth = []
    for _ in range(scenes_n):
        scene = scenes.make_scene(rng)
        image = cv2.cvtColor(cv2.resize(scene.image, (size, size), interpolation=cv2.INTER_NEAREST), cv2.COLOR_RGB2BGR)
        for _ in range(hold):
            writer.write(image)
            truth.append(scene.caption)
    writer.release()
    return truth


def count_frames(path: Path) -> int:
    capture, frames = cv2.VideoCapture(str(path)), 0
    while capture.read()[0]:
        frames += 1
    return frames


def run_app(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(APP), *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_the_app_captions_a_video_of_demo_scenes(tmp_path, seed, demo_export):
    video, out = tmp_path / "scenes.mp4", tmp_path / "overlaid.mp4"
    truth = write_video(video, np.random.default_rng(seed), scenes_n=15, hold=3)
    result = run_app(str(video), "--export", str(demo_export), "--headless", "--output", str(out))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["frame"] for row in rows] == list(range(len(truth)))  # a file: every frame, none dropped
    exact = np.mean([row["text"] == truth[row["frame"]] for row in rows])
    assert exact >= 0.8, [(row["text"], truth[row["frame"]]) for row in rows if row["text"] != truth[row["frame"]]]
    assert count_frames(out) == len(truth)
    assert f"wrote {len(truth)} frames" in result.stderr and "dropped 0" in result.stderr


def test_a_truncated_video_ends_cleanly_and_says_so(tmp_path, seed, demo_export):
    rng = np.random.default_rng(seed)
    avi, mp4 = tmp_path / "cut.avi", tmp_path / "cut.mp4"
    frames = len(write_video(avi, rng, scenes_n=10, hold=3, fourcc="MJPG"))
    write_video(mp4, rng, scenes_n=4, hold=3)
    for path in (avi, mp4):
        with open(path, "r+b") as file:
            file.truncate(path.stat().st_size // 2)
    out = tmp_path / "out.mp4"
    result = run_app(str(avi), "--export", str(demo_export), "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert f"of its {frames} frames (truncated or damaged file)" in result.stderr
    written = count_frames(out)
    assert 0 < written < frames and f"wrote {written} frames" in result.stderr  # what was read is kept, playable
    result = run_app(str(mp4), "--export", str(demo_export))  # an MP4 cut short has lost its index
    assert result.returncode == 2 and "damaged or truncated file" in result.stderr


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_the_video_stays_playable(tmp_path, seed, demo_export):
    import signal
    import time

    video, out = tmp_path / "long.mp4", tmp_path / "out.mp4"
    write_video(video, np.random.default_rng(seed), scenes_n=400, hold=5)  # 2,000 frames: far more than 3 s
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    app = subprocess.Popen([sys.executable, str(APP), str(video), "--export", str(demo_export), "--output", str(out),
                            "--headless"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    while not app.stdout.readline():  # the first result: the pipeline is running
        time.sleep(0.1)
    app.send_signal(signal.SIGINT)
    _, stderr = app.communicate(timeout=120)
    assert app.returncode == 0, stderr
    assert "stopping (Ctrl-C)" in stderr and "Traceback" not in stderr
    written = int(stderr.split("wrote ")[1].split(" frames")[0])
    assert 0 < written < 2000 and count_frames(out) == written


def test_sources_that_do_not_exist(tmp_path, demo_export):
    for uri, message in (("v4l2:///dev/video97", "no such camera device"), (str(tmp_path / "none.mp4"), "no such file"),
                         ("ftp://camera/1", "unknown source"), ("csi://x", "csi://N")):
        result = run_app(uri, "--export", str(demo_export))
        assert result.returncode == 2 and message in result.stderr, (uri, result.stderr)
    if "GStreamer:                   YES" not in cv2.getBuildInformation():
        with pytest.raises(FeatureUnavailableError, match="built without it: use JetPack's python3-opencv"):
            open_source("csi://0")


def test_a_lost_live_source_is_retried_then_reported(tmp_path, seed):
    """A live source that stops delivering is reopened with back-off; when it cannot be, SourceError says so. (A file
    stands in for the camera: marked live, then deleted once open, like a camera unplugged.)"""
    video = tmp_path / "camera.mp4"
    write_video(video, np.random.default_rng(seed), scenes_n=2, hold=2)
    source = open_source(str(video), retries=2, backoff_s=0.01)
    source.live = True  # at the end of the file the source is reopened, as a camera that came back
    assert [next(iter(source)).index for _ in range(10)] == list(range(10)) and source.reconnects == 2
    source = open_source(str(video), retries=2, backoff_s=0.01)
    source.live = True
    video.unlink()
    with pytest.raises(SourceError, match=r"lost after 4 frames; 2 reconnection attempts failed"):
        for _ in source:
            pass


def test_latest_frame_semantics_drop_and_count(tmp_path, seed, demo_export):
    video = tmp_path / "fast.mp4"
    write_video(video, np.random.default_rng(seed), scenes_n=20, hold=1)
    pieces = []
    with Pipeline.open(demo_export) as pipeline:
        stream = FrameStream(pipeline, open_source(str(video)), prompts=["caption:"], latest_only=True,
                             max_new_tokens=12, on_text=lambda frame, text: pieces.append((frame, text)))
        results = list(stream)
    for result in results:  # the text streamed token by token adds up to each result's text
        assert "".join(text for frame, text in pieces if frame == result.frame) == result.text
    counts = stream.stats.counts
    assert counts["read"] == 20 and counts["selected"] == 20
    assert counts["processed"] == len(results) and counts["processed"] + counts["dropped"] == 20
    assert counts["dropped"] > 0  # the source reads far faster than a caption is generated
    assert [r.frame for r in results] == sorted(r.frame for r in results)  # always a newer frame
    called = []
    with Pipeline.open(demo_export) as pipeline:  # callback only: run() blocks to the end, nothing is queued
        stream = FrameStream(pipeline, open_source(str(video)), prompts=["caption:"], on_result=called.append)
        stream.run()
    assert [r.frame for r in called] == list(range(20)) and stream._results.qsize() == 1  # only the end marker


def test_few_shot_preamble_and_rotating_prompts_reuse_the_caches(tmp_path, seed, demo_export):
    rng = np.random.default_rng(seed)
    shots = [scenes.make_scene(rng) for _ in range(2)]
    few_shot = [item for shot in shots for item in (shot.image, f"caption: {shot.caption}")]
    folder = tmp_path / "frames"
    folder.mkdir()
    frames = [scenes.make_scene(rng) for _ in range(4)]
    for index, scene in enumerate(frames):
        cv2.imwrite(str(folder / f"{index:03d}.png"), cv2.cvtColor(scene.image, cv2.COLOR_RGB2BGR))
    prompts = ["caption:", "question: how many shapes? answer:"]
    with Pipeline.open(demo_export) as pipeline:
        results = list(FrameStream(pipeline, open_source(f"file://{folder}"), prompts=prompts, few_shot=few_shot,
                                   max_new_tokens=12, every=1))
        reused = pipeline.stats["prefix_tokens_reused"]
    with Pipeline.open(demo_export, prefix_cache_bytes=0) as plain:  # the same prompts, one by one, no caches
        expected = [plain.complete([[*few_shot, scene.image, prompts[i % 2]]], max_new_tokens=12)[0].text
                    for i, scene in enumerate(frames)]
    assert [r.prompt for r in results] == [prompts[i % 2] for i in range(4)]
    assert [r.text for r in results] == expected
    assert reused > 0  # the preamble's K/V came from the prefix cache after the first frame


def test_embedding_example_in_the_docs_runs(tmp_path, seed, demo_export):
    """docs/camera.md's Python example, as written, on a short video."""
    write_video(tmp_path / "clip.mp4", np.random.default_rng(seed), scenes_n=2, hold=2)
    code = (ROOT / "docs" / "camera.md").read_text().split("```python\n", 1)[1].split("```", 1)[0]
    assert len(code.strip().splitlines()) <= 20
    env = {**os.environ, "FLAMINGO_EDGE_EXPORT": str(demo_export)}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("frame") == 4


def test_unchanged_frames_reuse_the_visual_tokens(tmp_path, seed, demo_export):
    """Identical frames always reuse the last frame's visual tokens; slightly different ones (sensor noise) do
    under a change threshold, and a new scene never does."""
    def thumbnail(image):
        return cv2.resize(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), (32, 32), interpolation=cv2.INTER_AREA)

    rng = np.random.default_rng(seed)
    first, second = scenes.make_scene(rng), scenes.make_scene(rng)
    while np.abs(thumbnail(first.image).astype(int) - thumbnail(second.image)).mean() < 4:  # a visibly new scene
        second = scenes.make_scene(rng)
    noisy = np.clip(first.image.astype(np.int16) + rng.integers(-3, 4, first.image.shape), 0, 255).astype(np.uint8)
    folder = tmp_path / "frames"
    folder.mkdir()
    for index, image in enumerate([first.image, first.image, noisy, second.image]):
        cv2.imwrite(str(folder / f"{index}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    for threshold, expected in ((0.0, [False, True, False, False]), (2.0, [False, True, True, False])):
        with Pipeline.open(demo_export) as pipeline:
            results = list(FrameStream(pipeline, open_source(str(folder)), prompts=["caption:"],
                                       change_threshold=threshold, max_new_tokens=12))
            assert [r.reused for r in results] == expected
            assert pipeline.stats["vision_runs"] == expected.count(False)
        assert results[2].text == results[0].text or threshold == 0.0  # the very same visual tokens


def test_the_app_runs_a_llama_3_2_vision_export(tmp_path, seed, mllama_export):
    """The camera app on an mllama export: frames of different shapes (1, 2 and 4 tiles), each followed by the
    prompt text, and every frame's text is what the pipeline gives that frame alone."""
    rng = np.random.default_rng(seed)
    folder = tmp_path / "frames"
    folder.mkdir()
    frames = [rng.integers(0, 256, size, dtype=np.uint8) for size in ((24, 20, 3), (30, 60, 3), (50, 55, 3))]
    for index, frame in enumerate(frames):
        cv2.imwrite(str(folder / f"{index:03d}.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    prompt = "Describe it."
    result = run_app(f"file://{folder}", "--export", str(mllama_export[1]), "--prompt", prompt, "--headless",
                     "--max-new-tokens", "6", "--every", "1")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    with Pipeline.open(mllama_export[1]) as pipeline:
        tiles = [pipeline.processor.image_preprocessor.tiles_of(frame) for frame in frames]
        expected = [pipeline.complete([[frame, prompt]], max_new_tokens=6)[0].text.strip() for frame in frames]
    assert sorted(tiles) == [1, 2, 4]
    assert [row["frame"] for row in rows] == [0, 1, 2]
    assert [row["text"] for row in rows] == expected

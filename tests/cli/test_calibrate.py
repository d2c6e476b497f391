"""`flamingo-edge calibrate`: what each graph saw is saved and reproducible; folders and videos as sources; bad input
fails with a typed error before any work and leaves no output."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from flamingo_edge.calibration.record import iter_samples, read_calibration
from flamingo_edge.cli.main import main
from flamingo_edge.demo import scenes
from flamingo_edge.errors import CalibrationError
from flamingo_edge.graphs import build_graphs
from flamingo_edge.config import FlamingoConfig


def write_video(path, frames: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    images = [scenes.make_scene(rng).image for _ in range(frames)]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5, (scenes.IMAGE_SIZE, scenes.IMAGE_SIZE))
    for image in images:
        writer.write(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    writer.release()
    return images


def test_demo_scenes_record_every_graph_and_are_reproducible(demo_export, tmp_path, seed):
    outs = [tmp_path / "first", tmp_path / "second"]
    for out in outs:
        assert main(["calibrate", str(demo_export), "--images", "demo", "--n", "5", "--seed", str(seed),
                     "-o", str(out)]) == 0
    record = read_calibration(outs[0])
    assert record.n_images == 5 and record.source == "demo" and record.seed == seed
    config = FlamingoConfig.from_dict(json.loads((demo_export / "export.json").read_text())["config"])
    specs = build_graphs(config)
    for graph in ("vision", "resampler", "xattn_kv"):
        samples = list(iter_samples(outs[0], graph))
        assert len(samples) == 5 and all(list(s) == specs[graph].input_names for s in samples)
    decoder = list(iter_samples(outs[0], "decoder"))
    prefills = [s for s in decoder if s["past_key.0"].shape[2] == 0]
    assert len(prefills) == 5 and len(decoder) > 5  # decode steps too
    assert all(s["input_ids"].shape[1] == 1 for s in decoder if s["past_key.0"].shape[2] > 0)
    again = list(iter_samples(outs[1], "decoder"))
    assert len(again) == len(decoder)
    for a, b in zip(decoder, again):
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])
    pixels = list(iter_samples(outs[0], "vision"))[0]["pixel_values"]
    assert pixels.shape == (1, 3, scenes.IMAGE_SIZE, scenes.IMAGE_SIZE) and pixels.dtype == np.float32


def test_folder_and_video_sources(demo_export, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for index in range(4):
        cv2.imwrite(str(folder / f"{index}.png"), cv2.cvtColor(scenes.make_scene(rng).image, cv2.COLOR_RGB2BGR))
    assert main(["calibrate", str(demo_export), "--images", str(folder), "--n", "3", "-o", str(tmp_path / "a")]) == 0
    assert read_calibration(tmp_path / "a").n_images == 3
    video = tmp_path / "scenes.avi"
    write_video(video, 12, seed=4)
    assert main(["calibrate", str(demo_export), "--images", str(video), "--n", "4", "-o", str(tmp_path / "b")]) == 0
    assert len(list(iter_samples(tmp_path / "b", "vision"))) == 4


def empty_folder(tmp):
    (tmp / "empty").mkdir()
    return tmp / "empty"


def fake_video(tmp):
    (tmp / "clip.mp4").write_text("not a video")
    return tmp / "clip.mp4"


@pytest.mark.parametrize("make_source, message", [
    (empty_folder, "is empty"), (fake_video, "cannot open"), (lambda tmp: tmp / "missing", "does not exist"),
])
def test_bad_sources_fail_before_any_work_and_leave_nothing(demo_export, tmp_path, capsys, make_source, message):
    source = make_source(tmp_path)
    out = tmp_path / "calib"
    assert main(["calibrate", str(demo_export), "--images", str(source), "-o", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".calib.partial-*"))


def test_wrong_kind_of_file_and_existing_output(demo_export, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "notes.txt").write_text("not an image")
    assert main(["calibrate", str(demo_export), "--images", str(folder), "-o", str(tmp_path / "c")]) == 2
    assert "every file there must be an image" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    assert main(["calibrate", str(demo_export), "--images", "demo", "-o", str(tmp_path / "taken")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_a_modified_or_partial_folder_is_refused(demo_export, tmp_path):
    out = tmp_path / "calib"
    assert main(["calibrate", str(demo_export), "--images", "demo", "--n", "2", "-o", str(out)]) == 0
    with (out / "vision.npz").open("ab") as file:
        file.write(b"x")
    with pytest.raises(CalibrationError, match="missing or was modified"):
        read_calibration(out)
    (out / "calibration.json").unlink()
    with pytest.raises(CalibrationError, match="not a complete calibration folder"):
        read_calibration(out)

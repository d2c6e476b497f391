"""Where calibration images come from: a folder of images, a video file, or `demo` (generated shape scenes).

Every source is checked and read before any graph runs, so a bad input fails at once with a typed error.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flamingo_edge.errors import CalibrationError, ImageError
from flamingo_edge.runtime.image import IMAGE_SUFFIXES, import_opencv, load_image

DEMO = "demo"
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v")


def load_images(source: str | Path, n: int, seed: int) -> list[np.ndarray]:
    """Up to `n` RGB uint8 images from `source`.

    - `demo`: n generated scenes (seeded; a seed other than training's 0 by default in the command).
    - a folder: its image files in name order, every one of them readable (a file that is not an image is an error,
      not skipped: calibrating on fewer images than asked would go unnoticed); the first n are used.
    - a video file: n frames spread evenly over the video.

    Raises:
        CalibrationError: a missing source, a folder without images, a video OpenCV cannot open or read.
        ImageError: a file in the folder that is not a decodable image.
    """
    if n < 1:
        raise CalibrationError(f"--n must be at least 1 (got {n})")
    if seed < 0:
        raise CalibrationError(f"--seed must be an integer >= 0 (got {seed})")
    if str(source) == DEMO:
        from flamingo_edge.demo import scenes

        rng = np.random.default_rng(seed)
        return [scenes.make_scene(rng).image for _ in range(n)]
    path = Path(source)
    if path.is_dir():
        return _folder_images(path, n)
    if path.is_file():
        if path.suffix.lower() in IMAGE_SUFFIXES:
            raise CalibrationError(f"{path} is a single image; calibration needs many: pass the folder that holds "
                                   "the images, a video file, or `demo`")
        return _video_frames(path, n)
    raise CalibrationError(f"calibration source {path} does not exist; pass a folder of images, a video file or "
                           "`demo`")


def _folder_images(folder: Path, n: int) -> list[np.ndarray]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise CalibrationError(f"{folder} is empty; put calibration images in it (PNG, JPEG, ...) or pass a video "
                               "or `demo`")
    images = []
    for file in files[:n]:
        try:
            images.append(load_image(file))
        except ImageError as error:
            raise ImageError(f"{error} (in the calibration folder {folder}; every file there must be an image)") \
                from None
    return images


def _video_frames(path: Path, n: int) -> list[np.ndarray]:
    """n frames spread evenly over the video (by its frame count; the first n when it reports none), decoding only
    those and skipping over the rest, so a long video costs no memory."""
    cv2 = import_opencv()

    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise CalibrationError(f"OpenCV cannot open {path} as a video (corrupt, or a codec this OpenCV build "
                                   f"lacks); known video suffixes: {', '.join(VIDEO_SUFFIXES)}")
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        wanted = set(np.linspace(0, count - 1, min(n, count)).round().astype(int).tolist()) if count > 0 else None
        frames, index = [], 0
        while capture.grab():
            if wanted is None and len(frames) == n:
                break
            if wanted is None or index in wanted:
                ok, frame = capture.retrieve()
                if ok:
                    frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
            index += 1
    finally:
        capture.release()
    if not frames:
        raise CalibrationError(f"{path} opened as a video but no frame could be read from it (truncated or empty)")
    return frames

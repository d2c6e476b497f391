"""Frame sources named by URI, as jetson-inference names them, read through OpenCV.

    path/to/clip.mp4, file://clip.mp4     a video file (ends at its last frame)
    path/to/folder/, file://folder        the images in a folder, in name order
    v4l2:///dev/video0 (or v4l2://0)      a USB/V4L2 camera (live)
    csi://0                               a Jetson CSI camera through GStreamer's nvarguscamerasrc (live)
    rtsp://host/stream, http(s)://...     a network stream (live)

`open_source(uri)` checks the source can be opened and raises `SourceError` (or `FeatureUnavailableError` for a
CSI camera without GStreamer) with the reason. A live source that stops delivering frames is reopened with
back-off; after `retries` failed attempts it raises `SourceError`. A file that ends early (truncated) ends the
source cleanly and says so in `end_reason`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flamingo_edge.errors import FeatureUnavailableError, ImageError, SourceError
from flamingo_edge.runtime.image import IMAGE_SUFFIXES, import_opencv, load_image

logger = logging.getLogger(__name__)

CSI_PIPELINE = ("nvarguscamerasrc sensor-id={sensor} ! video/x-raw(memory:NVMM),width={width},height={height},"
                "framerate={fps}/1 ! nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR ! "
                "appsink drop=true max-buffers=1")
# A network stream that goes silent without closing (a camera that lost power, a hung server) blocks OpenCV's FFmpeg
# backend in open() or read() for 30 s by default before it fails and we can reconnect. These bound that wait. A read
# must still get a keyframe within its timeout, so keep the read timeout above the camera's keyframe interval (GOP).
STREAM_OPEN_TIMEOUT_MS = 10_000
STREAM_READ_TIMEOUT_MS = 10_000


@dataclass(frozen=True)
class Frame:
    index: int  # 0, 1, ... in the order the source delivered them
    image: np.ndarray  # uint8 [H, W, 3] RGB
    seconds: float  # time.perf_counter() when it was read


class FrameSource:
    """Frames from a URI. Iterate it, or call `read()` until it returns None; `close()` releases the device."""

    def __init__(self, uri: str, *, retries: int = 5, backoff_s: float = 0.5, csi_size: tuple[int, int] = (1280, 720),
                 csi_fps: int = 30, loop: bool = False):
        """
        Args:
            uri: see the module doc.
            retries, backoff_s: a lost live source is reopened up to `retries` times, after backoff_s, 2 backoff_s...
            csi_size, csi_fps: the CSI camera mode.
            loop: start a file or folder again at its end (demos, soak tests); frame indices keep counting.
        """
        self.uri, self.retries, self.backoff_s, self.loop = uri, retries, backoff_s, loop
        self.csi_size, self.csi_fps = csi_size, csi_fps
        self.kind, self.target = _parse(uri)
        self.live = self.kind in ("v4l2", "csi", "stream")
        self.index, self.end_reason, self.reconnects, self._start = 0, None, 0, 0
        self.expected_frames: int | None = None
        self._capture, self._files = None, None
        self._open()

    def _open(self) -> None:
        cv2 = import_opencv()

        if self.kind == "folder":
            self._files = sorted(p for p in Path(self.target).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not self._files:
                raise SourceError(f"{self.uri}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            self.expected_frames = len(self._files)
            return
        if self.kind == "csi" and "GStreamer:                   YES" not in cv2.getBuildInformation():
            raise FeatureUnavailableError(
                f"{self.uri}: CSI cameras are read through GStreamer (nvarguscamerasrc), and this OpenCV "
                f"{cv2.__version__} was built without it: use JetPack's python3-opencv (pip's opencv-python has no "
                "GStreamer), or a v4l2:// camera")
        if self.kind == "file" and not Path(self.target).is_file():
            raise SourceError(f"{self.uri}: no such file")
        if self.kind == "v4l2" and isinstance(self.target, str) and not Path(self.target).exists():
            raise SourceError(f"{self.uri}: no such camera device ({self.target} does not exist; is it plugged in? "
                              "`ls /dev/video*` lists the cameras)")
        if self.kind == "csi":
            width, height = self.csi_size
            pipeline = CSI_PIPELINE.format(sensor=self.target, width=width, height=height, fps=self.csi_fps)
            capture = cv2.VideoCapture(pipeline, cv2.CAP_GSTREAMER)
        elif self.kind == "v4l2":
            capture = cv2.VideoCapture(self.target, cv2.CAP_V4L2)
        elif self.kind == "stream":
            timeouts = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, STREAM_OPEN_TIMEOUT_MS,
                        cv2.CAP_PROP_READ_TIMEOUT_MSEC, STREAM_READ_TIMEOUT_MS]
            capture = cv2.VideoCapture(self.target, cv2.CAP_ANY, timeouts)
        else:
            capture = cv2.VideoCapture(self.target)
        if not capture.isOpened():
            capture.release()
            why = (" (not a video, or a damaged or truncated file: an MP4 cut short has lost its index)"
                   if self.kind == "file" else "")
            raise SourceError(f"{self.uri}: OpenCV cannot open this {self.kind} source{why}")
        if self.kind == "file":
            count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
            self.expected_frames = count if count > 0 else None
        self._capture = capture

    def read(self) -> Frame | None:
        """The next frame, or None when the source has ended (then `end_reason` says why).

        Raises:
            SourceError: a live source was lost and could not be reopened after `retries` attempts.
        """
        if self.end_reason is not None:
            return None
        image = self._read_image()
        while image is None and self.live:
            image = self._reconnect()
        if image is None and self.loop and self.index > self._start:  # a file or folder: from the start again
            self.close()
            self._start = self.index
            self._open()
            image = self._read_image()
        if image is None:
            self._end()
            return None
        frame = Frame(self.index, image, time.perf_counter())
        self.index += 1
        return frame

    def _read_image(self) -> np.ndarray | None:
        cv2 = import_opencv()

        if self._files is not None:
            position = self.index - self._start
            if position >= len(self._files):
                return None
            path = self._files[position]
            try:
                return load_image(path)
            except ImageError as error:
                logger.warning("%s: skipping %s (%s)", self.uri, path.name, error)
                self._files.pop(position)
                return self._read_image()
        if self._capture is None:
            return None
        ok, image = self._capture.read()
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if ok and image is not None else None

    def _reconnect(self) -> np.ndarray | None:
        """Reopen a lost live source with exponential back-off; the first frame it gives, or SourceError."""
        for attempt in range(1, self.retries + 1):
            delay = self.backoff_s * 2 ** (attempt - 1)
            logger.warning("%s: no frame (camera lost?); reconnecting in %.1f s (attempt %d of %d)", self.uri, delay,
                           attempt, self.retries)
            self.close()
            time.sleep(delay)
            try:
                self._open()
            except SourceError:
                continue
            image = self._read_image()
            if image is not None:
                self.reconnects += 1
                return image
        self.close()
        self.end_reason = f"lost after {self.index} frames; {self.retries} reconnection attempts failed"
        raise SourceError(f"{self.uri}: the source was {self.end_reason}")

    def _end(self) -> None:
        expected, read = self.expected_frames, self.index - self._start
        if self._files is None and expected is not None and read < expected:
            self.end_reason = (f"the video ended after {read} of its {expected} frames (truncated or damaged file); "
                               "every frame read was processed")
            logger.warning("%s: %s", self.uri, self.end_reason)
        else:
            self.end_reason = f"end of {self.kind} after {self.index} frames"
        self.close()

    def close(self) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None

    def __iter__(self) -> Iterator[Frame]:
        while (frame := self.read()) is not None:
            yield frame

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _parse(uri: str) -> tuple[str, object]:
    """(kind, what OpenCV opens) for a URI: kind is file, folder, v4l2, csi or stream."""
    if uri.startswith("v4l2://"):
        device = uri[len("v4l2://"):]
        return "v4l2", int(device) if device.isdigit() else device
    if uri.startswith("csi://"):
        sensor = uri[len("csi://"):]
        if not sensor.isdigit():
            raise SourceError(f"{uri}: a CSI camera is csi://N, N the sensor id (csi://0)")
        return "csi", int(sensor)
    if uri.startswith(("rtsp://", "rtmp://", "http://", "https://")):
        return "stream", uri
    path = Path(uri[len("file://"):] if uri.startswith("file://") else uri)
    if "://" in uri and not uri.startswith("file://"):
        raise SourceError(f"{uri}: unknown source; use a path, file://, v4l2://, csi://, rtsp:// or http(s)://")
    return ("folder" if path.is_dir() else "file"), str(path)


def open_source(uri: str, **options) -> FrameSource:
    """Open a frame source by URI (see the module doc); options as `FrameSource`.

    Raises:
        SourceError: it cannot be opened (no such file or device, nothing OpenCV can read).
        FeatureUnavailableError: csi:// without GStreamer in OpenCV.
    """
    return FrameSource(uri, **options)

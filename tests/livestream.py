"""A live video stream on loopback for tests: ffmpeg (the static binary of the imageio-ffmpeg wheel) serves a looping
clip over HTTP as MPEG-TS, paced at real time (`-re`), to one client per ffmpeg process:

    ffmpeg -hide_banner -nostdin -loglevel warning -re -stream_loop -1 -i clip.mp4 -r 25 -c:v mpeg1video -q:v 2 \
        -f mpegts -listen 1 http://127.0.0.1:PORT/live.ts

`-listen 1` makes ffmpeg a one-shot HTTP server: it accepts one connection, closes its listening socket (a second
client is refused while the first is served), and exits (status 152, "Connection reset by peer", or 224, "Broken
pipe") at its first write after the client goes away. `LoopbackStream` therefore runs ffmpeg in a loop, starting a
fresh one each time the last exits, so a client that reconnects finds a server again after a short gap (ffmpeg
listens ~40 ms after it starts; a client that comes in that gap is refused and must retry, as FrameSource does).
`stop()` ends the loop: a reconnecting client is then refused until `start()` or `restart()`.

Any TCP connection counts as the client, so readiness is read from the kernel's socket table (Linux /proc/net/tcp),
never by connecting. ffmpeg cannot serve RTSP (it is only an RTSP client or publisher), so this covers the generic
OpenCV/FFmpeg network path, not RTSP's own handshake or teardown.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np

from flamingo_edge.demo import scenes

TCP_LISTEN = "0A"  # the LISTEN state in /proc/net/tcp


def make_clip(path: Path, frames: int = 25, size: int = 96, fps: int = 25, *, seed: int = 0) -> list[np.ndarray]:
    """Write an MP4 of `frames` different demo scenes, each numbered, one per frame; returns the frames (RGB).

    (tests/test_camera_app.py's write_video holds scenes for several frames at a fixed 10 fps; a stream test needs every
    frame different, to tell order and drops, and the stream's frame rate.)
    """
    rng, images = np.random.default_rng(seed), []
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (size, size))
    for index in range(frames):
        image = cv2.resize(scenes.make_scene(rng).image, (size, size), interpolation=cv2.INTER_NEAREST)
        cv2.putText(image, str(index), (2, size - 4), cv2.FONT_HERSHEY_SIMPLEX, size / 200, (0, 0, 0), 2)
        writer.write(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        images.append(image)
    writer.release()
    return images


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def is_listening(port: int) -> bool:
    """Whether a socket listens on `port`, from /proc/net/tcp{,6}: connecting would use up ffmpeg's one client."""
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        for row in table.read_text().splitlines()[1:] if table.exists() else ():
            local, state = row.split()[1], row.split()[3]
            if int(local.rsplit(":", 1)[1], 16) == port and state == TCP_LISTEN:
                return True
    return False


class LoopbackStream:
    """`clip_path` served live at `url` by ffmpeg, restarted after each client; a context manager."""

    def __init__(self, clip_path: Path, port: int | None = None, *, fps: int = 25, start_timeout_s: float = 10.0):
        try:
            import imageio_ffmpeg
        except ImportError as error:
            raise ImportError("LoopbackStream runs the ffmpeg of the imageio-ffmpeg wheel: pip install imageio-ffmpeg "
                              "(it is in the test extra)") from error
        if not Path("/proc/net/tcp").exists():
            raise RuntimeError("LoopbackStream reads whether ffmpeg listens from /proc/net/tcp, which only Linux has")
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/live.ts"
        self.start_timeout_s = start_timeout_s
        self.command = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "warning", "-re",
                        "-stream_loop", "-1", "-i", str(clip_path), "-r", str(fps), "-c:v", "mpeg1video", "-q:v", "2",
                        "-f", "mpegts", "-listen", "1", self.url]
        self.spawned = 0  # ffmpeg processes started so far: one per client served, plus the one waiting
        self._log = Path(tempfile.mkstemp(prefix="livestream-", suffix=".log")[1])  # all ffmpegs' stderr
        self._process: subprocess.Popen | None = None
        self._lock, self._stopping, self._thread = threading.Lock(), threading.Event(), None

    @property
    def pid(self) -> int | None:
        """The ffmpeg serving now (or waiting for a client), e.g. to SIGSTOP it and simulate a hung server."""
        with self._lock:
            return self._process.pid if self._process is not None else None

    def start(self) -> LoopbackStream:
        """Start serving; returns once ffmpeg listens. Raises RuntimeError with ffmpeg's stderr if it does not."""
        if self._thread is not None:
            raise RuntimeError(f"{self.url} is already being served; stop() or restart() it")
        self._stopping.clear()
        self._spawn()
        process, deadline = self._process, time.monotonic() + self.start_timeout_s
        while not is_listening(self.port):
            if process.poll() is not None:
                self._fail(f"ffmpeg exited with status {process.returncode} before serving {self.url}")
            if time.monotonic() > deadline:
                self._fail(f"ffmpeg did not listen on {self.url} within {self.start_timeout_s} s")
            time.sleep(0.01)
        # Only now that one ffmpeg served: a command that fails at once must not be restarted in a loop.
        self._thread = threading.Thread(target=self._serve, name=f"livestream:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving: end the restart loop, kill ffmpeg (a stopped one too) and wait for it; idempotent."""
        self._stopping.set()  # before taking the lock: the loop then starts no new ffmpeg
        with self._lock:
            process = self._process
        if process is not None and process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # its own session: ffmpeg and anything it started
            except ProcessLookupError:  # it exited (its client left) and was reaped meanwhile
                pass
            process.wait()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def restart(self) -> LoopbackStream:
        """Kill the server and serve again (a fresh ffmpeg, from the start of the clip)."""
        self.stop()
        return self.start()

    def stderr(self) -> str:
        """What every ffmpeg of this stream wrote to stderr so far (its last 4,000 characters)."""
        return self._log.read_text(errors="replace")[-4000:]

    def _fail(self, why: str) -> None:
        self.stop()
        message = f"{why}:\n{' '.join(self.command)}\n{self.stderr()}"
        self._log.unlink(missing_ok=True)
        raise RuntimeError(message)

    def _spawn(self) -> None:
        with self._lock:
            if self._stopping.is_set():
                return
            with open(self._log, "ab") as log:
                self._process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                                 stderr=log, start_new_session=True)
            self.spawned += 1

    def _serve(self) -> None:
        """Start a fresh ffmpeg each time the last exits (its client left), until stop()."""
        while not self._stopping.is_set():
            self._process.wait()
            time.sleep(0.05)  # no busy loop should a later ffmpeg fail at once (the port taken meanwhile)
            self._spawn()

    def __enter__(self) -> LoopbackStream:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        self._log.unlink(missing_ok=True)

"""Live captions or few-shot answers on a camera, a video or an image folder.

    python samples/camera_app.py SOURCE [SOURCE ...] [--export EXPORT|demo] [--prompt TEXT ...] [--few-shot FILE]
        [--every N | --fps F] [--max-new-tokens N] [--output OUT.mp4] [--display] [--headless]
        [--backend onnxruntime|tensorrt --engines ENGINES]

SOURCE: a video or image folder (path or file://), v4l2:///dev/video0, csi://0 (Jetson, GStreamer), rtsp://...,
http://... Several sources run at once: each keeps its own frames (a live one its latest), and their generations share
one decode batch (in-flight batching, flamingo_edge.runtime.scheduler); --output and --display take one source.
Outputs: --output writes every frame with the latest caption drawn on it; --display shows them in a window;
--headless prints one JSON object per processed frame on stdout (the default when no output is given).
Ctrl-C stops cleanly; the output video is closed and stays playable. Thin on purpose: parse -> Pipeline -> stream ->
draw; the streaming lives in flamingo_edge.runtime.stream.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from pathlib import Path

from flamingo_edge.cli.backends import add_backend_arguments, pipeline_options
from flamingo_edge.errors import FlamingoEdgeError, UsageError


def parse_args(argv=None) -> argparse.Namespace:
    from flamingo_edge.cli.arguments import count, text

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="+", metavar="SOURCE",
                        help="video file or folder (path or file://), v4l2:///dev/videoN, csi://N, rtsp://..., "
                             "http://...; several run at once")
    parser.add_argument("--export", default="demo",
                        help="an export folder, or demo: the bundled checkpoint's cached export (default: demo)")
    parser.add_argument("--precision", choices=("fp32", "fp16", "int8"),
                        help="refuse an export of another precision (make one with flamingo-edge quantize)")
    parser.add_argument("--prompt", action="append", dest="prompts", metavar="TEXT", type=text,
                        help="text after each frame; repeat to rotate prompts (default: 'caption:')")
    parser.add_argument("--few-shot", metavar="FILE",
                        help='JSON list of {"image": path, "text": ...} examples put before every frame')
    parser.add_argument("--every", type=count, default=1, help="take every N-th frame (default: 1)")
    parser.add_argument("--fps", type=float, help="take at most F frames a second")
    parser.add_argument("--change-threshold", type=float, default=0.0,
                        help="frames differing less than this (mean 0-255 on a thumbnail) reuse the last one's "
                             "visual tokens (default: 0, identical frames only)")
    parser.add_argument("--max-new-tokens", type=count, default=16, help="(default: 16)")
    parser.add_argument("--output", metavar="OUT.mp4", help="write the frames with the caption drawn on them")
    parser.add_argument("--display", action="store_true", help="show the frames in a window")
    parser.add_argument("--headless", action="store_true", help="JSON lines on stdout (default with no output)")
    parser.add_argument("--max-batch", type=count,
                        help="with several sources: most frames decoded together (default: one per source)")
    add_backend_arguments(parser)
    return parser.parse_args(argv)


def load_few_shot(path: str) -> list:
    from flamingo_edge.runtime.processor import load_image

    try:
        examples = json.loads(Path(path).read_text())
        items = []
        for example in examples:
            items += [load_image(Path(path).parent / example["image"]), example["text"]]
        return items
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UsageError(f"--few-shot {path}: expected a JSON list of {{\"image\": path, \"text\": ...}} ({error})") \
            from None


class Overlay:
    """Draws the latest caption on every frame; writes them to a video and/or shows them (on the source thread)."""

    def __init__(self, output: str | None, display: bool, fps: float):
        import cv2

        self.cv2, self.output, self.display, self.fps = cv2, output, display, fps
        self.caption, self.writer, self.frames = "", None, 0
        self.lock = threading.Lock()
        if display:
            try:
                cv2.namedWindow("flamingo-edge", cv2.WINDOW_NORMAL)
            except cv2.error:
                raise UsageError("--display: this OpenCV has no window support or there is no display (headless "
                                 "OpenCV, or no $DISPLAY); use --output or --headless") from None

    def set_caption(self, text: str) -> None:
        with self.lock:
            self.caption = text.strip()

    def __call__(self, frame) -> None:
        cv2 = self.cv2
        image = cv2.cvtColor(frame.image, cv2.COLOR_RGB2BGR)
        scale = max(image.shape[1] / 640, 0.4)
        with self.lock:
            caption = self.caption
        cv2.rectangle(image, (0, 0), (image.shape[1], int(28 * scale)), (0, 0, 0), -1)
        cv2.putText(image, caption, (4, int(20 * scale)), cv2.FONT_HERSHEY_SIMPLEX, 0.6 * scale, (255, 255, 255),
                    max(1, int(scale)), cv2.LINE_AA)
        if self.output:
            if self.writer is None:
                self.writer = cv2.VideoWriter(self.output, cv2.VideoWriter_fourcc(*"mp4v"), self.fps,
                                              (image.shape[1], image.shape[0]))
                if not self.writer.isOpened():
                    raise UsageError(f"--output {self.output}: OpenCV cannot write this video file")
            self.writer.write(image)
            self.frames += 1
        if self.display:
            cv2.imshow("flamingo-edge", image)
            cv2.waitKey(1)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()  # writes the index: the file is playable
            self.writer = None
        if self.display:
            self.cv2.destroyAllWindows()


def run(args: argparse.Namespace) -> int:
    from flamingo_edge.artifacts import read_export_record
    from flamingo_edge.demo.bundle import resolve_export
    from flamingo_edge.runtime.pipeline import Pipeline
    from flamingo_edge.runtime.sources import open_source
    from flamingo_edge.runtime.stream import FrameStream, MultiStream

    export = resolve_export(args.export)
    precision = read_export_record(export).precision
    if args.precision and args.precision != precision:
        raise UsageError(f"{export} is a {precision} export, not {args.precision}: make one with flamingo-edge "
                         f"quantize {export} --precision {args.precision} -o OUT, then --export OUT")
    few_shot = load_few_shot(args.few_shot) if args.few_shot else []
    headless = args.headless or not (args.output or args.display)
    if len(args.sources) > 1 and (args.output or args.display):
        raise UsageError("--output and --display draw one source; with several sources use --headless (JSON lines "
                         "name each result's source)")
    sources = [open_source(uri) for uri in args.sources]
    overlay = Overlay(args.output, args.display, fps=args.fps or 10.0)
    options = dict(prompts=args.prompts or ["caption:"], few_shot=few_shot, every=args.every, fps=args.fps,
                   max_new_tokens=args.max_new_tokens, change_threshold=args.change_threshold)
    with Pipeline.open(export, **pipeline_options(args)) as pipeline:
        if len(sources) == 1:
            stream = FrameStream(pipeline, sources[0], on_frame=overlay,
                                 on_result=lambda result: overlay.set_caption(result.text), **options)
            streams = [stream]
        else:
            stream = MultiStream(pipeline, sources, max_batch=args.max_batch, **options)
            streams = stream.streams
        try:
            for result in stream:
                if headless:
                    line = {"frame": result.frame, "prompt": result.prompt, "text": result.text.strip(),
                            "reused": result.reused, "dropped": result.dropped,
                            "seconds": {k: round(v, 4) for k, v in result.seconds.items()}}
                    if len(sources) > 1:
                        line = {"source": result.source, **line}
                    print(json.dumps(line), flush=True)
        except KeyboardInterrupt:
            print("stopping (Ctrl-C)", file=sys.stderr)
        finally:
            stream.stop()
            overlay.close()
    for each in streams:
        counts, rates = each.stats.counts, each.stats.rates()
        name = f"{each.source.uri}: " if len(sources) > 1 else ""
        error = getattr(stream, "errors", {}).get(each.source.uri)
        print(f"{name}{error or each.source.end_reason or 'stopped'}; frames read {counts['read']}, processed "
              f"{counts['processed']}, dropped {counts['dropped']}, unchanged/cached {counts['reused']}; "
              f"{rates['processed']:.1f} processed/s"
              + (f"; wrote {overlay.frames} frames to {args.output}" if args.output else ""), file=sys.stderr)
    if len(sources) > 1 and stream.scheduler.stats["steps"]:
        stats = stream.scheduler.stats
        print(f"decode batch: {stats['rows_stepped'] / stats['steps']:.2f} frames per step on average over "
              f"{stats['steps']} steps", file=sys.stderr)
    return 2 if getattr(stream, "errors", None) and len(stream.errors) == len(sources) else 0


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(parse_args(argv))
    except FlamingoEdgeError as error:
        print(f"camera_app: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the stream runs (e.g. while `demo` is first exported); nothing is half-written
        print("camera_app: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

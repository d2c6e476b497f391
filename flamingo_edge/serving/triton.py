"""A Pipeline behind Triton Inference Server, with PyTriton: the `flamingo` and `flamingo_stream` models.

    client --HTTP / gRPC--> tritonserver --> Python-backend stub (a process per model instance)
        --local socket--> an inference function in this process --> Scheduler.submit
            --> the one decode batch that every request joins at a token boundary (in-flight batching)

PyTriton runs the inference functions in this process; tritonserver's Python backend only forwards requests. For a
model that is not decoupled, Triton waits for each call of an instance to return before handing that instance
another request. So `flamingo` has one instance per batch row (`max_batch`), Triton's batching off, and each call
submits one request to the shared Scheduler and waits for it. The decoupled `flamingo_stream` returns from Triton's
call at once, so one instance carries every stream: an async generator that waits for the next token in a thread.

pytriton is imported inside functions: this module imports without it (the base install has no PyTriton).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sysconfig
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

from flamingo_edge.errors import FlamingoEdgeError, ImageError, PromptError, UsageError
from flamingo_edge.runtime.image import import_opencv
from flamingo_edge.runtime.processor import IMAGE_MARKER, check_text, prompt_items
from flamingo_edge.runtime.scheduler import CANCELLED

logger = logging.getLogger(__name__)

MODEL, STREAM_MODEL = "flamingo", "flamingo_stream"
DEFAULT_MAX_NEW_TOKENS = 32
# tritonserver waits this long for in-flight requests and for the models to unload. Unloading takes ~2 s per
# Python-backend instance here, one instance after the other; PyTriton kills tritonserver after 30 s, which leaves
# the stubs still unloading behind (serve() kills those). Above the unload time of max_batch <= 10, below 30 s.
EXIT_TIMEOUT_S = 25
STREAM_THREADS_PER_ROW = 4  # a stream waiting in the scheduler's queue holds a thread too
# PyTriton 0.7: the instances of a model start at once, and every instance but the first connects to a Unix socket
# of the first as soon as its file exists; between the first's bind and listen it is refused ("Connection refused"
# in get_config_from_handshake_server) and the model does not load. Seen in 2 of ~8 test runs on a busy 2-core
# machine. Triton is then started again, this many times in all.
LOAD_ATTEMPTS = 3


def decode_image(data: bytes, index: int, count: int) -> np.ndarray:
    """An encoded image file (PNG, JPEG, anything OpenCV reads) -> uint8 RGB [H, W, 3].

    Raises:
        ImageError: OpenCV cannot decode the bytes.
    """
    cv2 = import_opencv()
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if bgr is None:
        raise ImageError(f"image {index + 1} of {count} ({len(data)} bytes) is not an image file OpenCV can decode; "
                         "send each image as the bytes of its encoded file (PNG or JPEG: open(path, 'rb').read()), not "
                         "as decoded pixels")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _scalar(inputs: Mapping[str, np.ndarray], name: str, default):
    return inputs[name].reshape(-1)[0].item() if name in inputs else default


def request_from_inputs(inputs: Mapping[str, np.ndarray]) -> tuple[list, dict]:
    """One Triton request's inputs -> (the prompt's items, `Scheduler.submit` settings).

    Args:
        inputs: `prompt` (one UTF-8 string, `<image>` where each image goes), `image` (one encoded file per marker;
            absent for a text-only prompt), and optionally `max_new_tokens`, `temperature`, `seed`.

    Raises:
        PromptError: the prompt is not UTF-8 text, or its markers and images differ in number.
        ImageError: an image that cannot be decoded.
    """
    try:
        prompt = bytes(inputs["prompt"].reshape(-1)[0]).decode("utf-8")
    except UnicodeDecodeError as error:
        raise PromptError(f"the prompt is not UTF-8 text ({error}); send the prompt encoded as UTF-8") from None
    check_text(prompt, "the prompt")
    encoded = [bytes(item) for item in inputs["image"].reshape(-1)] if "image" in inputs else []
    markers = prompt.count(IMAGE_MARKER)
    if markers != len(encoded):
        raise PromptError(f"the prompt has {markers} '{IMAGE_MARKER}' markers but {len(encoded)} images were sent; "
                          f"send one encoded image file in the 'image' input per '{IMAGE_MARKER}', in order")
    images = [decode_image(data, index, len(encoded)) for index, data in enumerate(encoded)]
    settings = {"max_new_tokens": _scalar(inputs, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS),
                "temperature": _scalar(inputs, "temperature", 0.0), "seed": _scalar(inputs, "seed", None)}
    return prompt_items(prompt, images), settings


def model_signature() -> tuple[list, list]:
    """The inputs and outputs (PyTriton tensors) of both models; no batch dimension (Triton's batching is off)."""
    from pytriton.model_config import Tensor

    inputs = [Tensor(name="prompt", dtype=bytes, shape=(1,)),
              Tensor(name="image", dtype=bytes, shape=(-1,), optional=True),
              Tensor(name="max_new_tokens", dtype=np.int32, shape=(1,), optional=True),
              Tensor(name="temperature", dtype=np.float32, shape=(1,), optional=True),
              Tensor(name="seed", dtype=np.int64, shape=(1,), optional=True)]
    outputs = [Tensor(name="text", dtype=bytes, shape=(1,)),
               Tensor(name="token_ids", dtype=np.int64, shape=(-1,)),
               Tensor(name="finish_reason", dtype=bytes, shape=(1,))]
    return inputs, outputs


def _outputs(text: str, token_ids: list[int], finish_reason: str | None) -> dict[str, np.ndarray]:
    return {"text": np.array([text.encode("utf-8")], dtype=object), "token_ids": np.array(token_ids, np.int64),
            "finish_reason": np.array([(finish_reason or "").encode()], dtype=object)}


class ServingMetrics:
    """Requests by model and outcome, time to first token and tokens/s per request; rendered in Prometheus' text
    format with the scheduler's and the pipeline's counters."""

    def __init__(self):
        self._lock = threading.Lock()
        self._requests: Counter = Counter()  # (model, outcome) -> requests
        self._sums: Counter = Counter()  # "ttft" / "tokens_per_s" -> (sum, count) as two keys each

    def record(self, model: str, outcome: str, request=None) -> None:
        """`outcome`: "ok", "refused" (a bad request), "cancelled" or "error"; `request` a finished Scheduler
        request, whose ttft_s and tokens_per_s are summed."""
        with self._lock:
            self._requests[model, outcome] += 1
            for name in ("ttft_s", "tokens_per_s"):
                value = getattr(request, name, None)
                if value is not None:
                    self._sums[name, "sum"] += value
                    self._sums[name, "count"] += 1

    def render(self, scheduler_stats: Mapping, pipeline_stats: Mapping) -> str:
        with self._lock:
            requests, sums = dict(self._requests), dict(self._sums)
        steps = scheduler_stats.get("steps", 0)
        lines = ["# HELP flamingo_requests_total Requests answered, by model and outcome.",
                 "# TYPE flamingo_requests_total counter"]
        lines += [f'flamingo_requests_total{{model="{m}",outcome="{o}"}} {n}' for (m, o), n in sorted(requests.items())]
        for name, metric, what in (("ttft_s", "flamingo_time_to_first_token_seconds", "Time to first token"),
                                   ("tokens_per_s", "flamingo_request_tokens_per_second", "Tokens per second")):
            lines += [f"# HELP {metric} {what} of finished requests.", f"# TYPE {metric} summary",
                      f"{metric}_sum {sums.get((name, 'sum'), 0.0)}", f"{metric}_count {sums.get((name, 'count'), 0)}"]
        lines += ["# HELP flamingo_batch_occupancy Mean rows per decode step of the scheduler.",
                  "# TYPE flamingo_batch_occupancy gauge",
                  f"flamingo_batch_occupancy {scheduler_stats.get('rows_stepped', 0) / steps if steps else 0.0}"]
        for prefix, stats in (("flamingo_scheduler", scheduler_stats), ("flamingo_pipeline", pipeline_stats)):
            for key, value in sorted(stats.items()):
                lines += [f"# TYPE {prefix}_{key}_total counter", f"{prefix}_{key}_total {value}"]
        return "\n".join(lines) + "\n"


def start_metrics_endpoint(host: str, port: int, render: Callable[[], str]) -> ThreadingHTTPServer:
    """Serve `render()` at http://host:port/metrics from a daemon thread; `.shutdown()` stops it.

    Raises:
        UsageError: the port cannot be bound.
    """

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = render().encode() if self.path.split("?")[0] == "/metrics" else None
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.end_headers()
            self.wfile.write(body if body is not None else b"see /metrics\n")

        def log_message(self, format, *args):  # noqa: A002 (BaseHTTPRequestHandler's signature)
            logger.debug("metrics endpoint: " + format, *args)

    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as error:
        raise UsageError(f"cannot serve the flamingo metrics on {host}:{port} (--metrics-port + 1): {error}; "
                         "pick another --metrics-port") from None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="flamingo-metrics", daemon=True).start()
    return server


class FlamingoModels:
    """The inference functions of `flamingo` and `flamingo_stream`, over one started Scheduler."""

    def __init__(self, scheduler, metrics: ServingMetrics, *, stream_threads: int):
        self.scheduler, self.metrics = scheduler, metrics
        self._waiting = ThreadPoolExecutor(max_workers=stream_threads, thread_name_prefix="flamingo-stream")

    def close(self) -> None:
        self._waiting.shutdown(wait=False, cancel_futures=True)

    def bind(self, triton, *, instances: int) -> None:
        """Bind both models to a PyTriton `Triton` (`instances`: concurrent calls of `flamingo`)."""
        from pytriton.model_config import ModelConfig

        inputs, outputs = model_signature()
        triton.bind(MODEL, [self.complete] * instances, inputs, outputs, config=ModelConfig(batching=False),
                    strict=True)
        triton.bind(STREAM_MODEL, self.stream, inputs, outputs,
                    config=ModelConfig(batching=False, decoupled=True), strict=True)

    def _submit(self, model: str, inputs: Mapping[str, np.ndarray]):
        try:
            prompt, settings = request_from_inputs(inputs)
            return self.scheduler.submit(prompt, **settings)
        except FlamingoEdgeError as error:
            self.metrics.record(model, "refused")
            # PyTriton answers this request with the formatted traceback: keep the library's frames out of it
            raise error.with_traceback(None)

    def complete(self, requests) -> list[dict[str, np.ndarray]]:
        """`flamingo`: the completion of each request (Triton hands over one: its batching is off)."""
        responses = []
        for triton_request in requests:
            request = self._submit(MODEL, triton_request.data)
            try:
                completion = request.result()
            except BaseException:
                self.metrics.record(MODEL, "error")
                raise
            self.metrics.record(MODEL, "ok", request)
            responses.append(_outputs(completion.text, completion.token_ids, completion.finish_reason))
        return responses

    async def stream(self, requests):
        """`flamingo_stream`: one response per generated token (its text may be empty), the last one with its
        finish_reason; PyTriton then sends Triton's empty final response. Ending early (PyTriton cancels the task at
        shutdown) cancels the request."""
        (triton_request,) = requests  # batching off: a decoupled model gets one request per call
        loop = asyncio.get_running_loop()
        request = await loop.run_in_executor(self._waiting, self._submit, STREAM_MODEL, triton_request.data)
        steps, finished, outcome = iter(request), False, "cancelled"
        try:
            while not finished:
                # the steps end with a finished one, or raise; `None` only because StopIteration cannot cross a Future
                step = await loop.run_in_executor(self._waiting, next, steps, None)
                if step is None:
                    break
                finished = step.finished
                yield [_outputs(step.text, [step.token] if step.token >= 0 else [], step.finish_reason)]
            outcome = "ok" if finished and step.finish_reason != CANCELLED else outcome
        except Exception:
            outcome = "error"
            raise
        finally:  # also when PyTriton cancels this task (shutdown): free the row at the next token boundary
            if not finished:
                request.cancel()
            self.metrics.record(STREAM_MODEL, outcome, request if finished else None)


def _libpython_first() -> None:
    """Put this interpreter's libpython first on LD_LIBRARY_PATH for tritonserver and its stubs.

    The Python-backend stub links libpython3.X.so; with a Python built outside the system (pyenv), the system's
    library is found first and fails against this interpreter's standard library (model load: "'_thread.RLock' object
    has no attribute '_recursion_count'"; measured with PyTriton 0.7, shared/notes/triton.md).
    """
    libdir = sysconfig.get_config_var("LIBDIR")
    paths = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p and p != libdir]
    if libdir:
        os.environ["LD_LIBRARY_PATH"] = ":".join([libdir, *paths])


def _check_ports(host: str, ports: Mapping[str, int]) -> None:
    """Refuse a port used twice or already taken, before tritonserver starts (it would wait for a timeout)."""
    if len(set(ports.values())) != len(ports):
        raise UsageError(f"the ports must differ: {dict(ports)}")
    for flag, port in ports.items():
        if not 0 < port <= 65535:
            raise UsageError(f"{flag} is {port}; a port is 1 to 65535")
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: a closed port is free
            try:
                probe.bind((host, port))
            except OSError as error:
                raise UsageError(f"cannot listen on {host}:{port} ({flag}): {error}; pick another {flag}") from None


def _process_tree(root: int) -> dict[int, str]:
    """pid -> start time of every process below `root` (from /proc: tritonserver, its stubs, PyTriton's helpers)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # gone meanwhile
                continue
            table[int(entry.name)] = (int(fields[1]), fields[19])  # ppid (field 4), starttime (field 22)
    below, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, start) in table.items():
            if ppid == parent and pid not in below:
                below[pid] = start
                frontier.append(pid)
    return below


def _alive(tree: Mapping[int, str]) -> list[int]:
    """The pids of `tree` (pid -> start time) still running (not reused by another process meanwhile)."""
    running = []
    for pid, start in tree.items():
        try:
            if (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[19] == start:
                running.append(pid)
        except OSError:  # gone, as it should be
            continue
    return running


def _kill_leftovers(tree: Mapping[int, str], grace_s: float = 5.0) -> None:
    """SIGKILL what is left of `tree` `grace_s` after the stop: a stub still unloading when tritonserver gave up
    waiting lives on (it does not notice its parent is gone) and holds its shared memory."""
    deadline = time.monotonic() + grace_s
    while (running := _alive(tree)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in running:
        logger.warning("process %d of the Triton server outlived its stop; killing it", pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def handshake_refused(error: BaseException) -> bool:
    """Whether a model load failed in PyTriton's instance handshake race (LOAD_ATTEMPTS), not for a reason that
    another start would not mend."""
    text = str(error)
    return "get_config_from_handshake_server" in text and "Connection refused" in text


def serve(export_dir: str | Path, *, backend: str = "onnxruntime", engines: str | Path | None = None,
          cuda_graph: bool = False, host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 8001,
          metrics_port: int = 8002, max_batch: int = 8, on_ready: Callable[[], None] | None = None) -> None:
    """Serve an export with Triton Inference Server (PyTriton) until interrupted (KeyboardInterrupt).

    Triton's metrics are at http://host:metrics_port/metrics, ours at http://host:(metrics_port + 1)/metrics.

    Args:
        export_dir: a folder written by `flamingo-edge export`.
        backend, engines, cuda_graph: as for `Pipeline.open`.
        host: the address every endpoint binds to.
        http_port, grpc_port, metrics_port: Triton's ports.
        max_batch: requests decoded together by the Scheduler; also the instances of `flamingo`.
        on_ready: called once both models are loaded.

    Raises:
        UsageError: a port is taken or given twice; max_batch < 1; settings `Pipeline.open` refuses.
        ExportError, EngineMismatchError, FeatureUnavailableError: as for `Pipeline.open`.
    """
    from pytriton.triton import Triton, TritonConfig

    from flamingo_edge.runtime.pipeline import Pipeline
    from flamingo_edge.runtime.scheduler import Scheduler

    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise UsageError(f"max_batch must be an integer >= 1; got {max_batch!r}")
    _check_ports(host, {"--http-port": http_port, "--grpc-port": grpc_port, "--metrics-port": metrics_port,
                        "--metrics-port + 1": metrics_port + 1})
    _libpython_first()
    config = TritonConfig(http_address=host, http_port=http_port, grpc_address=host, grpc_port=grpc_port,
                          metrics_address=host, metrics_port=metrics_port, exit_timeout_secs=EXIT_TIMEOUT_S)
    metrics = ServingMetrics()
    with (Pipeline.open(export_dir, backend=backend, engines=engines, cuda_graph=cuda_graph) as pipeline,
          Scheduler(pipeline, max_batch=max_batch) as scheduler):
        rows = scheduler.max_batch  # at most what TensorRT engines were built for
        models = FlamingoModels(scheduler, metrics, stream_threads=STREAM_THREADS_PER_ROW * rows)
        endpoint = start_metrics_endpoint(host, metrics_port + 1,
                                          lambda: metrics.render(dict(scheduler.stats), dict(pipeline.stats)))
        triton, tree = None, {}
        try:
            for attempt in range(1, LOAD_ATTEMPTS + 1):
                triton = Triton(config=config)
                models.bind(triton, instances=rows)
                try:
                    triton.run()  # starts tritonserver and loads both models
                    break
                except Exception as error:
                    if attempt == LOAD_ATTEMPTS or not handshake_refused(error):
                        raise
                    logger.warning("a model instance could not reach the first one (PyTriton's handshake race); "
                                   "starting Triton again (attempt %d of %d)", attempt + 1, LOAD_ATTEMPTS)
                    started = _process_tree(os.getpid())
                    triton.stop()
                    _kill_leftovers(started)
            tree = _process_tree(os.getpid())
            try:
                if on_ready is not None:
                    on_ready()
                triton.serve()  # returns once stopped: PyTriton stops the server on KeyboardInterrupt
            except KeyboardInterrupt:  # the stop, asked for before serve() was waiting for it: stopped below
                pass
        finally:
            if triton is not None:
                triton.stop()  # no-op when serve() stopped it
            _kill_leftovers(tree)
            endpoint.shutdown()
            endpoint.server_close()
            models.close()

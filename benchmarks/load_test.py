"""Load test: requests/s, p50/p99 latency and lost requests at 1 and at C concurrent clients, in the same run.

    python benchmarks/load_test.py EXPORT [--requests N] [--concurrency C] [--max-new-tokens T] [--rounds R]
        [--json OUT]
    python benchmarks/load_test.py EXPORT --triton grpc://127.0.0.1:8001 [...]      (a running `flamingo-edge serve`)

Each client sends its next request as soon as its last one is answered (closed loop), so C clients keep at most C
requests in flight. Every request is a new random 224x224 image (no image-cache hit; the two phases use different
images) after the same short text, and asks for T tokens greedily. Without --triton the requests go to an in-process
`Scheduler` over a Pipeline (the same in-flight batching `serve` runs); with it, to the server's `flamingo` model
over gRPC (the client needs `tritonclient[grpc]`). The ratio of the two phases' requests/s is the gain of in-flight
batching on this machine. The N requests of each phase are sent in R rounds that alternate the phases (one at a
time, concurrent, concurrent, one at a time, ...), so that a machine whose load drifts weighs on both alike.
Bounded: N requests per phase (default 64, at most 400), loopback only.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

PROMPT = "User: describe this picture in detail{image}\nAssistant:"
MAX_REQUESTS = 400


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export", help="an export folder (what the server serves, for --triton)")
    parser.add_argument("--requests", type=int, default=64, help=f"per phase (default 64, at most {MAX_REQUESTS})")
    parser.add_argument("--concurrency", type=int, default=8, help="clients in the concurrent phase (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="per request (default 32)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per phase (default 2)")
    parser.add_argument("--max-batch", type=int, help="in-process scheduler's batch limit (default: --concurrency)")
    parser.add_argument("--triton", metavar="grpc://HOST:PORT", help="send to a running flamingo-edge serve")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take (default 600)")
    parser.add_argument("--json", metavar="OUT", help="also write the report as JSON")
    args = parser.parse_args(argv)
    if not 1 <= args.requests <= MAX_REQUESTS or min(args.concurrency, args.max_new_tokens, args.rounds) < 1:
        parser.error(f"--requests must be 1..{MAX_REQUESTS}, --concurrency, --max-new-tokens and --rounds >= 1")
    if args.requests % args.rounds:
        parser.error("--requests must be a multiple of --rounds")
    if args.triton and not args.triton.startswith("grpc://"):
        parser.error("--triton takes grpc://HOST:PORT (the server's gRPC port)")
    return args


def images(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(n)]


class InProcess:
    """Requests to a Scheduler over a Pipeline in this process."""

    def __init__(self, export: str, max_batch: int):
        from flamingo_edge.runtime.pipeline import Pipeline
        from flamingo_edge.runtime.scheduler import Scheduler

        self.pipeline = Pipeline.open(export)
        self.scheduler = Scheduler(self.pipeline, max_batch=max_batch).start()

    def __call__(self, image: np.ndarray, max_new_tokens: int, timeout: float) -> int:
        before, after = PROMPT.split("{image}")
        request = self.scheduler.submit([before, image, after], max_new_tokens=max_new_tokens)
        return len(request.result(timeout).token_ids)

    def stats(self) -> dict:
        stats = self.scheduler.stats
        return {"decode_steps": stats["steps"], "rows_stepped": stats["rows_stepped"], "decode_s": stats["decode_s"],
                "prefill_s": stats["prefill_s"], "gather_s": stats["gather_s"]}

    def close(self) -> None:
        self.scheduler.close()
        self.pipeline.close()


class Triton:
    """Requests to a flamingo-edge serve's `flamingo` model over gRPC (one client per thread)."""

    def __init__(self, url: str):
        import cv2
        import tritonclient.grpc as grpcclient

        self.url, self.cv2, self.grpc, self.local = url.removeprefix("grpc://"), cv2, grpcclient, threading.local()

    def __call__(self, image: np.ndarray, max_new_tokens: int, timeout: float) -> int:
        grpc = self.grpc
        if not hasattr(self.local, "client"):
            self.local.client = grpc.InferenceServerClient(self.url)
        encoded = self.cv2.imencode(".png", self.cv2.cvtColor(image, self.cv2.COLOR_RGB2BGR))[1].tobytes()
        inputs = []
        for name, value, dtype in (("prompt", np.array([PROMPT.format(image="<image>").encode()], object), "BYTES"),
                                   ("image", np.array([encoded], object), "BYTES"),
                                   ("max_new_tokens", np.array([max_new_tokens], np.int32), "INT32")):
            tensor = grpc.InferInput(name, list(value.shape), dtype)
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
        result = self.local.client.infer("flamingo", inputs, client_timeout=timeout)
        return int(result.as_numpy("token_ids").size)

    def stats(self) -> dict:
        return {}

    def close(self) -> None:
        pass


def phase(send, pictures: list[np.ndarray], concurrency: int, max_new_tokens: int, timeout: float) -> dict:
    """Send every picture from `concurrency` closed-loop clients; latency per request, failures counted."""
    latencies, tokens, failures, lock = [], [], [], threading.Lock()
    queue = iter(range(len(pictures)))

    def client():
        while True:
            with lock:
                index = next(queue, None)
            if index is None:
                return
            start = time.perf_counter()
            try:
                count = send(pictures[index], max_new_tokens, timeout)
            except Exception as error:  # noqa: BLE001 - a lost request is counted and reported, not fatal
                with lock:
                    failures.append(f"{type(error).__name__}: {error}")
                continue
            with lock:
                latencies.append(time.perf_counter() - start)
                tokens.append(count)

    before = send.stats()
    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds, after = time.perf_counter() - start, send.stats()
    return {"requests": len(pictures), "latencies": latencies, "tokens": sum(tokens), "failures": failures,
            "seconds": seconds, **{name: after[name] - before[name] for name in after}}


def summary(rounds: list[dict], concurrency: int) -> dict:
    """One phase's rounds together: requests/s and tokens/s over their summed time, latency percentiles over all."""
    seconds = sum(r["seconds"] for r in rounds)
    latencies = [value for r in rounds for value in r["latencies"]]
    latency = np.array(latencies) if latencies else np.array([np.nan])
    failures = [failure for r in rounds for failure in r["failures"]]
    report = {"concurrency": concurrency, "requests": sum(r["requests"] for r in rounds), "answered": len(latencies),
              "errors": failures[:5], "seconds": seconds, "requests_per_s": len(latencies) / seconds,
              "tokens_per_s": sum(r["tokens"] for r in rounds) / seconds,
              "latency_p50_s": float(np.percentile(latency, 50)), "latency_p99_s": float(np.percentile(latency, 99)),
              "rounds_requests_per_s": [len(r["latencies"]) / r["seconds"] for r in rounds]}
    report["lost"] = report["requests"] - report["answered"]
    steps = sum(r.get("decode_steps", 0) for r in rounds)
    if steps:  # in process: the scheduler thread's time, by kind of work
        report["mean_decode_batch"] = sum(r["rows_stepped"] for r in rounds) / steps
        for name in ("decode_s", "prefill_s", "gather_s"):
            report[name] = sum(r[name] for r in rounds)
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    send = Triton(args.triton) if args.triton else InProcess(args.export, args.max_batch or args.concurrency)
    try:
        send(images(1, 99)[0], 2, args.timeout)  # warm-up: sessions, thread pools
        per_round = args.requests // args.rounds
        pictures = {1: images(args.requests, 1), args.concurrency: images(args.requests, 2)}  # new images each
        rounds = {1: [], args.concurrency: []}
        for index in range(args.rounds):
            order = (1, args.concurrency) if index % 2 == 0 else (args.concurrency, 1)
            for concurrency in order:
                chunk = pictures[concurrency][index * per_round:(index + 1) * per_round]
                rounds[concurrency].append(phase(send, chunk, concurrency, args.max_new_tokens, args.timeout))
    finally:
        send.close()
    one, many = summary(rounds[1], 1), summary(rounds[args.concurrency], args.concurrency)
    report = {"export": str(Path(args.export)), "target": args.triton or "in-process scheduler",
              "max_new_tokens": args.max_new_tokens, "rounds": args.rounds, "one_at_a_time": one, "concurrent": many,
              "throughput_ratio": many["requests_per_s"] / one["requests_per_s"] if one["requests_per_s"] else None}
    for name in ("one_at_a_time", "concurrent"):
        row = report[name]
        print(f"{name:>14}: {row['concurrency']} client(s), {row['answered']}/{row['requests']} answered "
              f"({row['lost']} lost), {row['requests_per_s']:.2f} requests/s, {row['tokens_per_s']:.1f} tokens/s, "
              f"latency p50 {row['latency_p50_s'] * 1e3:.0f} ms, p99 {row['latency_p99_s'] * 1e3:.0f} ms")
        for error in row["errors"]:
            print(f"{'':>16}{error}")
    if report["throughput_ratio"]:
        print(f"in-flight batching: x{report['throughput_ratio']:.2f} the requests/s of one at a time"
              + (f" (mean decode batch {many['mean_decode_batch']:.2f})" if "mean_decode_batch" in many else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if one["lost"] == 0 and many["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

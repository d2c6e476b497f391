"""The flamingo-edge generation model for Triton's Python backend (written by `flamingo-edge triton-repo` as
REPO/flamingo/1/model.py, next to flamingo.json and the tokenizer files).

    execute(requests) ── a thread per request, then returns at once (Triton sends the next requests meanwhile)
    request thread:   decode the images ─▶ Scheduler.submit: tokenize, vision ─▶ resampler ─▶ xattn_kv (BLS, cached)
    scheduler thread: prefill, then decode steps of every running request together ─▶ decoder (BLS)
    request thread:   the completion ─▶ its response sender (one response per request, as a non-decoupled model)

The graphs are other models of the same server (onnxruntime, tensorrt_plan or python), called through BLS by
`TritonModelSession`, which implements the runtime's Session protocol: the Pipeline and Scheduler are flamingo-edge's
own, and both KV caches stay in this process. Needs flamingo-edge (with numpy, OpenCV and tokenizers) importable by
the Python that runs the backend stub (docs/triton_repo.md).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from flamingo_edge.config import FlamingoConfig
from flamingo_edge.errors import FlamingoEdgeError, ImageError, PromptError, UsageError
from flamingo_edge.graphs import GRAPH_NAMES, build_graphs
from flamingo_edge.runtime.backend import BaseSession
from flamingo_edge.runtime.pipeline import Pipeline
from flamingo_edge.runtime.processor import Processor
from flamingo_edge.runtime.scheduler import Scheduler
from flamingo_edge.serving.repository import read_settings
from flamingo_edge.serving.triton import request_from_inputs

CANCEL_POLL_S = 0.1  # how often a waiting request checks whether its client went away


class TritonModelSession(BaseSession):
    """One graph served by another model of this server, run through BLS; fed and read by the contract's names."""

    closed_hint = "load the flamingo model again"

    def __init__(self, spec, model_name: str, input_dtypes: dict):
        self.spec, self.model_name, self.input_dtypes = spec, model_name, input_dtypes
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def _release(self) -> None:
        self._closed = True

    def _run(self, feed):
        inputs = [pb_utils.Tensor(name, np.ascontiguousarray(feed[name], self.input_dtypes.get(name)))
                  for name in self.spec.input_names]
        response = pb_utils.InferenceRequest(model_name=self.model_name, inputs=inputs,
                                             requested_output_names=self.spec.output_names).exec()
        if response.has_error():
            raise FlamingoEdgeError(f"{self.spec.name}: the Triton model {self.model_name!r} failed: "
                                    f"{response.error().message()}; see the tritonserver log")
        # copies: a session's outputs belong to the caller, who keeps some of them (the KV caches)
        return {name: np.array(pb_utils.get_output_tensor_by_name(response, name).as_numpy())
                for name in self.spec.output_names}


def open_scheduler(folder: Path) -> Scheduler:
    """A Scheduler (not started) over the Pipeline of flamingo.json's graph models."""
    settings = read_settings(folder)
    config = FlamingoConfig.from_dict(settings.config)
    specs = build_graphs(config)
    sessions = {name: TritonModelSession(specs[name], settings.models[name], settings.input_dtypes.get(name, {}))
                for name in GRAPH_NAMES}
    pipeline = Pipeline(config=config, sessions=sessions, processor=Processor.from_pretrained(folder),
                        max_context=settings.max_context, max_images=settings.max_images,
                        image_cache_size=settings.image_cache_size, prefix_cache_bytes=settings.prefix_cache_bytes,
                        max_prompt=settings.max_prompt, max_batch=settings.max_batch)
    return Scheduler(pipeline, max_batch=settings.max_batch, one_graph_at_a_time=settings.one_graph_at_a_time)


def read_request(request) -> tuple[list, dict]:
    """The prompt's items (text pieces and images, in order) and the generation settings a request holds, read as
    `flamingo-edge serve` reads them (`serving.triton.request_from_inputs`).

    Raises:
        PromptError: the prompt is not UTF-8, or its `<image>` markers do not match the images.
        ImageError: an image cannot be decoded.
    """
    inputs = {}
    for name in ("prompt", "image", "max_new_tokens", "temperature", "seed"):
        found = pb_utils.get_input_tensor_by_name(request, name)
        if found is not None:
            inputs[name] = found.as_numpy()
    return request_from_inputs(inputs)


def error_response(error: BaseException, code) -> pb_utils.InferenceResponse:
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(error).__name__}: {error}", code))


class TritonPythonModel:
    """Generation over the graph models: every request joins the Scheduler's in-flight batch at once."""

    def initialize(self, args):
        self.scheduler = open_scheduler(Path(args["model_repository"]) / args["model_version"]).start()

    def execute(self, requests):
        for request in requests:
            threading.Thread(target=self._answer, args=(request, request.get_response_sender()),
                             name="flamingo-request", daemon=True).start()
        return None  # the responses go through each request's sender

    def _answer(self, request, sender) -> None:
        try:
            prompt, settings = read_request(request)
            completion = self._wait(request, self.scheduler.submit(prompt, **settings))
            response = pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("text", np.array([completion.text.encode("utf-8")], dtype=object)),
                pb_utils.Tensor("token_ids", np.array(completion.token_ids, np.int64))])
        except (UsageError, PromptError, ImageError) as error:  # the request's fault
            response = error_response(error, pb_utils.TritonError.INVALID_ARG)
        except Exception as error:  # noqa: BLE001 - a request never answered leaves its client waiting forever
            response = error_response(error, pb_utils.TritonError.INTERNAL)
        sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    @staticmethod
    def _wait(request, job):
        """The request's completion; cancelled (its batch row freed) once the client has gone away."""
        while True:
            try:
                return job.result(timeout=CANCEL_POLL_S)
            except TimeoutError:
                if request.is_cancelled():
                    job.cancel()

    def finalize(self):
        self.scheduler.close()
        self.scheduler.pipeline.close()

"""The TensorRT backend's own code (runtime/tensorrt_backend.py, runtime/cuda.py), unmodified, on the CPU stand-in for
CUDA and TensorRT (tests/trt_standin): real engines built on the CPU by TensorRT for RTX, run as their ONNX graphs by
ONNX Runtime behind TensorRT's and cuda-python's APIs, compared with the ONNX Runtime backend on the same export.

What this proves and what still needs a GPU: docs/engines.md, "The CPU stand-in (tests only)".
"""

from __future__ import annotations

import threading
from unittest import mock

import numpy as np
import pytest

from flamingo_edge.cli.main import main
from flamingo_edge.graphs import GRAPH_NAMES
from flamingo_edge.runtime import cuda
from flamingo_edge.runtime.pipeline import Pipeline
from trt_standin import installed
from trt_standin.cuda_runtime import CudaRuntime
from trt_standin.tensorrt_module import NUMPY_TYPES, ILogger

pytest.importorskip("tensorrt_rtx", reason="CI installs tensorrt-rtx with the test extras (it builds the engines)")
MAX_CONTEXT = 48
LIMITS = ["--max-context", str(MAX_CONTEXT), "--max-prompt", "32", "--max-images", "3", "--max-batch", "2"]
ATOL = 1e-5  # the same ONNX graphs run by the same ONNX Runtime: any difference is the backend's doing
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def engines(demo_export, tmp_path_factory):
    out = tmp_path_factory.mktemp("standin") / "engines-sm86"
    assert main(["build", str(demo_export), "-o", str(out), "--target", "rtx-sm86", *LIMITS]) == 0
    return out


def frame(seed: int) -> np.ndarray:
    """A random RGB image of a random size (the processor resizes it)."""
    rng = np.random.default_rng(seed)
    height, width = rng.integers(16, 80, size=2)
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


PROMPTS = {
    "batch_of_one": lambda: [["a photo of", frame(1), "the shapes are"]],
    "batch_of_two_left_padded": lambda: [["a photo of", frame(2), "two", frame(3), "what colour"],
                                         ["hi", frame(4), "the"]],
}


class Tap:
    """Forwards to a session and keeps a copy of every feed and output."""

    def __init__(self, inner):
        self.inner, self.spec, self.calls = inner, inner.spec, []

    def run(self, feed):
        outputs = self.inner.run(feed)
        self.calls.append(({k: np.array(v) for k, v in feed.items()}, {k: np.array(v) for k, v in outputs.items()}))
        return outputs

    def __getattr__(self, name):
        return getattr(self.inner, name)


def tap(*pipelines: Pipeline) -> None:
    for pipeline in pipelines:
        pipeline.sessions = {name: Tap(session) for name, session in pipeline.sessions.items()}


def laid_out_differently(name: str, tensor: str) -> bool:
    """The decoder's past and its mask: the TensorRT backend reads its cache's whole buffers (mirrored on the device,
    `whole_past`) where ONNX Runtime is fed the used slots of a prefill's past; the new K/V and the logits that come
    out must still be equal."""
    return name == "decoder" and (tensor == "attention_mask" or tensor.startswith(("past_key.", "past_value.")))


def real_tokens(feed) -> np.ndarray:
    """[B, S] bool: the decoder run's new tokens that are not padding."""
    return feed["attention_mask"][:, -feed["input_ids"].shape[1]:].astype(bool)


def at_real_tokens(tensor: str, array: np.ndarray, real: np.ndarray) -> np.ndarray:
    """A decoder output at its real tokens only. A left-padding token's query has no key it may attend to, so its
    output (and from the second layer on, its K/V, which every later query masks) is whatever the softmax over
    nothing gives: it differs with how many masked slots the past has."""
    if tensor == "logits":  # [B, S, V]
        return array[real]
    return array.transpose(0, 2, 1, 3)[real]  # new K/V [B, H, S, Dh] -> [real tokens, H, Dh]


def assert_same_graph_runs(ours: Pipeline, reference: Pipeline) -> None:
    """Every graph ran as often, on the same feeds (but for the decoder's past layout), with the same outputs."""
    for name in GRAPH_NAMES:
        mine, theirs = ours.sessions[name].calls, reference.sessions[name].calls
        assert len(mine) == len(theirs), f"{name}: {len(mine)} runs, ONNX Runtime {len(theirs)}"
        for index, ((feed, outputs), (want_feed, want_outputs)) in enumerate(zip(mine, theirs)):
            for what, got, want in (("input", feed, want_feed), ("output", outputs, want_outputs)):
                for tensor in want:
                    if what == "input" and laid_out_differently(name, tensor):
                        continue
                    actual, desired = got[tensor], want[tensor]
                    if what == "output" and name == "decoder":
                        real = real_tokens(want_feed)
                        actual, desired = at_real_tokens(tensor, actual, real), at_real_tokens(tensor, desired, real)
                    np.testing.assert_allclose(actual, desired, rtol=0, atol=ATOL,
                                               err_msg=f"{name} run {index}: {what} {tensor}")


def assert_clean(standin) -> None:
    """No rule broken, and everything allocated was freed when the pipeline closed."""
    assert standin.cuda.violations == []
    assert sum(standin.cuda.live().values()) == 0, standin.cuda.live()


def compare_with_onnxruntime(engines, demo_export, prompts, *, cuda_graph: bool, **standin_options):
    """Logits, two greedy generations (the second replays what the first captured) and every graph run of the
    TensorRT pipeline on the stand-in against ONNX Runtime's. Returns the stand-in (its events) and the pipeline."""
    with installed(engines, demo_export, **standin_options) as standin:
        with Pipeline.open(demo_export, backend="tensorrt", engines=engines, cuda_graph=cuda_graph) as ours, \
                Pipeline.open(demo_export, max_context=MAX_CONTEXT, static_decode=ours.static_decode) as reference:
            tap(ours, reference)
            got, want = ours.logits(prompts), reference.logits(prompts)
            real = real_tokens(reference.sessions["decoder"].calls[-1][0])
            np.testing.assert_allclose(got[real], want[real], rtol=0, atol=ATOL)
            for _ in range(2):
                got = ours.complete(prompts, max_new_tokens=NEW_TOKENS, stop_token_ids=[])
                want = reference.complete(prompts, max_new_tokens=NEW_TOKENS, stop_token_ids=[])
                assert [c.token_ids for c in got] == [c.token_ids for c in want]
            assert_same_graph_runs(ours, reference)
    assert_clean(standin)
    return standin, ours


@pytest.mark.parametrize("case", sorted(PROMPTS))
def test_tokens_logits_and_every_graph_run_equal_onnxruntime(engines, demo_export, case):
    standin, ours = compare_with_onnxruntime(engines, demo_export, PROMPTS[case](), cuda_graph=False)
    assert standin.cuda.events["captures_begun"] == 0 and not ours.static_decode


@pytest.mark.parametrize("case", sorted(PROMPTS))
def test_cuda_graphs_are_captured_and_replayed_with_the_same_results(engines, demo_export, case):
    standin, ours = compare_with_onnxruntime(engines, demo_export, PROMPTS[case](), cuda_graph=True)
    events = standin.cuda.events
    assert ours.static_decode  # fixed decode shapes: one graph serves every step of both generations
    assert events["captures"] >= 1 and events["captures_invalidated"] == 0
    assert events["graph_launches"] >= NEW_TOKENS, dict(events)  # most decode steps of two generations replayed
    assert events["replayed_ops"] >= events["graph_launches"] and events["foreign_captured_ops"] == 0


def test_a_context_tensorrt_cannot_capture_runs_without_graphs(engines, demo_export):
    standin, ours = compare_with_onnxruntime(engines, demo_export, PROMPTS["batch_of_one"](), cuda_graph=True,
                                             capturable=False)
    assert standin.cuda.events["captures_begun"] == 0 and not ours.static_decode


def test_synchronous_streams_give_the_same_results(engines, demo_export):
    compare_with_onnxruntime(engines, demo_export, PROMPTS["batch_of_two_left_padded"](), cuda_graph=True,
                             asynchronous=False)


def test_int64_inputs_presented_as_int32_as_tensorrt_8_5_does(engines, demo_export):
    standin, ours = compare_with_onnxruntime(engines, demo_export, PROMPTS["batch_of_two_left_padded"](),
                                             cuda_graph=True, int64_as_int32=True)
    engine = standin.tensorrt.Runtime(ILogger()).deserialize_cuda_engine((engines / "decoder.engine").read_bytes())
    assert engine.get_tensor_dtype("input_ids") == standin.tensorrt.DataType.INT32
    assert engine.get_tensor_dtype("attention_mask") == standin.tensorrt.DataType.INT32
    assert standin.cuda.events["graph_launches"] >= NEW_TOKENS


# The stand-in's own checks can fail.


@pytest.fixture
def bare_cuda():
    """The CUDA stand-in alone, installed where flamingo_edge.runtime.cuda looks for cuda-python."""
    runtime = CudaRuntime()
    with mock.patch("flamingo_edge.runtime.cuda.runtime_module", lambda: runtime):
        yield runtime


def test_copies_outside_one_live_allocation_of_the_right_kind_are_refused(bare_cuda):
    stream, device, pinned = cuda.Stream(), cuda.DeviceBuffer(64), cuda.PinnedBuffer(64)
    pinned.view(np.float32, (16,))[:] = np.arange(16)
    cuda.copy_to_device(device, pinned, 64, stream)
    stream.synchronize()
    with pytest.raises(cuda.CudaError, match=r"CUDA cudaMemcpyAsync failed: cudaErrorInvalidValue \(invalid argument"):
        cuda.copy_to_device(device, pinned, 65, stream)
    assert "dst 65 B at offset 0 overruns a 64 B device allocation by 1 B" in bare_cuda.violations[-1]
    with pytest.raises(cuda.CudaError, match="cudaErrorInvalidValue"):
        cuda.copy_to_host(device, pinned, 64, stream)  # the buffers swapped: pinned memory where device is needed
    assert "dst 0x" in bare_cuda.violations[-1] and "is device memory; expected pinned" in bare_cuda.violations[-1]
    device.close()
    with pytest.raises(cuda.CudaError, match="cudaErrorInvalidValue"):
        cuda.copy_to_device(cuda.DeviceBuffer(64), pinned, 128, stream)
    assert "overruns a 64 B device allocation" in bare_cuda.violations[-1]
    for resource in (stream, pinned):
        resource.close()


def test_a_binding_smaller_than_its_tensor_is_refused_by_execute(engines, demo_export):
    with installed(engines, demo_export) as standin:
        trt = standin.tensorrt
        log = mock.Mock(spec=ILogger)
        engine = trt.Runtime(log).deserialize_cuda_engine((engines / "xattn_kv.engine").read_bytes())
        context = engine.create_execution_context()
        stream = cuda.Stream()
        assert context.set_optimization_profile_async(0, stream.ptr)
        assert context.set_input_shape("visual_tokens", (2, 12, 128))
        assert not context.set_input_shape("visual_tokens", (7, 12, 128))  # above the profile's max N
        # every output [2, 4, 12, 32] fits; the input's binding is sized for one image, [1, 12, 128]
        names = [engine.get_tensor_name(index) for index in range(engine.num_io_tensors)]
        buffers = {name: cuda.DeviceBuffer(12 * 128 * 4 if name == "visual_tokens" else 2 * 4 * 12 * 32 * 4)
                   for name in names}
        for name, buffer in buffers.items():
            context.set_tensor_address(name, buffer.ptr)
        assert not context.execute_async_v3(stream.ptr)
        assert "binding visual_tokens (2, 12, 128): 12288 B at offset 0 overruns a 6144 B device allocation by " \
               "6144 B" in standin.cuda.violations[-1]
        assert "enqueueV3" in log.log.call_args.args[1]
        for buffer in buffers.values():
            buffer.close()
        stream.close()


def test_capture_records_any_threads_work_and_refuses_a_synchronize(bare_cuda):
    stream, device, pinned = cuda.Stream(), cuda.DeviceBuffer(16), cuda.PinnedBuffer(16)
    pinned.view(np.uint8, (16,))[:] = 7

    def enqueue():
        other = threading.Thread(target=cuda.copy_to_device, args=(device, pinned, 16, stream), name="camera")
        other.start(), other.join()

    graph = cuda.CudaGraph(stream, enqueue)  # the other thread's copy is recorded, not run
    assert bare_cuda.events["foreign_captured_ops"] == 1 and "from camera was recorded" in bare_cuda.violations[-1]
    graph.launch(stream)
    stream.synchronize()
    assert bare_cuda.events["replayed_ops"] == 1
    with pytest.raises(cuda.CudaError, match="cudaStreamEndCapture failed: cudaErrorStreamCaptureInvalidated"):
        cuda.CudaGraph(stream, stream.synchronize)  # the synchronize fails inside; the capture ends invalidated
    assert "cudaStreamSynchronize on capturing stream" in bare_cuda.violations[-1]
    for resource in (graph, device, pinned, stream):
        resource.close()


def test_the_stand_ins_names_are_cuda_pythons_and_tensorrt_rtxs(engines, demo_export):
    runtime = pytest.importorskip("cuda.bindings.runtime", reason="cuda-python comes with the tensorrt extras")
    import tensorrt_rtx

    for enum in (CudaRuntime.cudaError_t, CudaRuntime.cudaMemcpyKind, CudaRuntime.cudaStreamCaptureMode):
        real = getattr(runtime, enum.__name__)
        assert {m.name: int(m) for m in enum} == {m.name: int(getattr(real, m.name)) for m in enum}
    for error in CudaRuntime.cudaError_t:
        assert CudaRuntime().cudaGetErrorString(error)[1] == runtime.cudaGetErrorString(
            runtime.cudaError_t(int(error)))[1]
    assert CudaRuntime.cudaStreamNonBlocking == runtime.cudaStreamNonBlocking
    functions = [name for name in dir(CudaRuntime) if name.startswith("cuda") and callable(getattr(CudaRuntime, name))
                 and not isinstance(getattr(CudaRuntime, name), type)]
    assert len(functions) >= 17 and all(hasattr(runtime, name) for name in functions)
    with installed(engines, demo_export) as standin:
        trt = standin.tensorrt
        for enum in (trt.DataType, trt.TensorIOMode, trt.ILogger.Severity):
            real = tensorrt_rtx.ILogger.Severity if enum is trt.ILogger.Severity else getattr(tensorrt_rtx,
                                                                                                 enum.__name__)
            assert {m.name: int(m) for m in enum} == {m.name: int(getattr(real, m.name)) for m in enum}
        for member in NUMPY_TYPES:  # those numpy has
            assert np.dtype(trt.nptype(member)) == np.dtype(tensorrt_rtx.nptype(getattr(tensorrt_rtx.DataType,
                                                                                        member.name)))
        engine = trt.Runtime(ILogger()).deserialize_cuda_engine((engines / "vision.engine").read_bytes())
        context = engine.create_execution_context()
        for ours, real in ((trt.Runtime(ILogger()), tensorrt_rtx.Runtime), (engine, tensorrt_rtx.ICudaEngine),
                           (context, tensorrt_rtx.IExecutionContext)):
            public = [name for name in vars(type(ours)) if not name.startswith("_")]
            public += [name for name in vars(ours) if name in ("engine_host_code_allowed", "DLA_core")]
            missing = [name for name in public if not hasattr(real, name)]
            assert missing in ([], ["output_shapes"]), f"{real.__name__} has no {missing}"


# Two threads on one pipeline: the camera stream (runtime/stream.py) encodes frames on its source thread while its
# worker thread generates (issue 17 finding 3). Both tests below fail on the backend before commit ce94618 (one stream
# and shared staging for every session): wrong frame K/V, and the camera thread's synchronize refused because the
# decoder was capturing its copies. Since ce94618 (a stream and a lock per session) they pass.


def expected_kv_and_tokens(demo_export, frames, prompts):
    with Pipeline.open(demo_export, max_context=MAX_CONTEXT, static_decode=True, image_cache_size=0) as reference:
        kv = [reference.image_kv(image) for image in frames]
        tokens = [[c.token_ids for c in reference.complete(p, max_new_tokens=NEW_TOKENS, stop_token_ids=[])]
                  for p in prompts]
    return kv, tokens


def assert_kv_equal(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for index, (mine, theirs) in enumerate(zip(got, want)):
        for name in theirs:
            np.testing.assert_allclose(mine[name], theirs[name], rtol=0, atol=ATOL, err_msg=f"frame {index}: {name}")


def test_frames_encoded_on_one_thread_while_another_generates(engines, demo_export):
    """Free-running: every frame's K/V and every generation equal the single-threaded ONNX Runtime ones. No image
    cache, so both threads run vision, resampler and xattn_kv, while the decoder captures and replays graphs."""
    frames = [frame(100 + i) for i in range(16)]
    prompts = [[["a photo of", frame(200 + i), "the shapes are"]] for i in range(3)]
    want_kv, want_tokens = expected_kv_and_tokens(demo_export, frames, prompts)
    errors, got_kv, got_tokens = [], [], []

    def guarded(work):
        def run():
            try:
                work()
            except BaseException as error:  # reported by the test below
                errors.append(error)
        return run

    with installed(engines, demo_export) as standin:
        with Pipeline.open(demo_export, backend="tensorrt", engines=engines, cuda_graph=True,
                           image_cache_size=0) as ours:
            camera = threading.Thread(target=guarded(lambda: got_kv.extend(ours.image_kv(f) for f in frames)))
            worker = threading.Thread(target=guarded(lambda: got_tokens.extend(
                [c.token_ids for c in ours.complete(p, max_new_tokens=NEW_TOKENS, stop_token_ids=[])]
                for p in prompts)))
            camera.start(), worker.start()
            camera.join(timeout=300), worker.join(timeout=300)
            assert not camera.is_alive() and not worker.is_alive()
    assert errors == []
    assert_kv_equal(got_kv, want_kv)
    assert got_tokens == want_tokens
    assert standin.cuda.events["graph_launches"] >= 1
    assert_clean(standin)


def test_a_frame_encoded_while_the_decoder_captures_its_graph(engines, demo_export):
    """The interleaving made certain: as the decoder's capture begins, the camera thread encodes a frame, and the
    capture goes on only when that frame is done. Nothing of the frame's may land in the graph."""
    image, prompt = frame(300), [["a photo of", frame(301), "the shapes are"]]
    want_kv, want_tokens = expected_kv_and_tokens(demo_export, [image], [prompt])
    camera: dict = {}

    def encode_a_frame(stream_handle):
        if camera:
            return
        camera["started"] = True

        def encode():
            try:
                camera["kv"] = ours.image_kv(image)
            except BaseException as error:  # reported by the test below
                camera["error"] = error

        thread = threading.Thread(target=encode, name="camera")
        thread.start(), thread.join(timeout=120)
        camera["finished"] = not thread.is_alive()

    with installed(engines, demo_export) as standin:
        with Pipeline.open(demo_export, backend="tensorrt", engines=engines, cuda_graph=True,
                           image_cache_size=0) as ours:
            standin.cuda.on_begin_capture = encode_a_frame
            tokens = [c.token_ids for c in ours.complete(prompt, max_new_tokens=NEW_TOKENS, stop_token_ids=[])]
    assert camera.get("started") and camera.get("finished")
    assert "error" not in camera, camera.get("error")
    assert_kv_equal([camera["kv"]], want_kv)
    assert [tokens] == want_tokens
    assert standin.cuda.events["captures"] >= 1 and standin.cuda.events["graph_launches"] >= 1
    assert_clean(standin)


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_the_self_attention_cache_stays_on_the_device(engines, demo_export, cuda_graph):
    """Issue 16 on TensorRT: a decode step copies none of the past to the device (the decoder reads the mirror of
    the runtime's cache, written on the device with the new K/V), so what a step copies does not depend on how many
    tokens are cached. A second generation of the same prompt reuses its prefix from the host's prefix cache: the
    mirror then takes exactly the prefix's slots from the host, once."""
    prompts = PROMPTS["batch_of_one"]()
    with installed(engines, demo_export) as standin:
        with Pipeline.open(demo_export, backend="tensorrt", engines=engines, cuda_graph=cuda_graph) as ours:
            text = ours.config.decoder
            slot_bytes = text.heads * text.head_dim * 4  # one token of one layer's K (or V), batch of one
            copied = standin.cuda.bytes_copied
            steps, before = [], copied["HostToDevice"]
            for _ in ours.generate(prompts, max_new_tokens=NEW_TOKENS, stop_token_ids=[]):
                steps.append(copied["HostToDevice"] - before)
                before = copied["HostToDevice"]
            decode = steps[1:]
            # the same bytes at every step (input ids, the mask's columns, cross K/V, image mask): none of the past
            assert len(set(decode)) <= 2 and max(decode) < slot_bytes * text.layers, decode
            cached = len(steps) + ours.processor.tokenize(prompts).input_ids.shape[1] - 1
            assert max(decode) < 2 * text.layers * cached * slot_bytes / 4  # far below the cache's own size

            # the prefix cache hands the prompt's K/V back from the host: the mirror is refreshed with those slots
            pageable = standin.cuda.events["enqueued HostToDevice"]
            again = ours.complete(prompts, max_new_tokens=NEW_TOKENS, stop_token_ids=[])
            assert ours.prefix_cache.hits == 1
    with Pipeline.open(demo_export, max_context=MAX_CONTEXT) as reference:
        want = reference.complete(prompts, max_new_tokens=NEW_TOKENS, stop_token_ids=[])
    assert [c.token_ids for c in again] == [c.token_ids for c in want]
    assert standin.cuda.events["enqueued HostToDevice"] > pageable
    assert_clean(standin)


def test_compare_passes_through_the_tensorrt_backend(engines, demo_export):
    """`flamingo-edge compare --backend tensorrt`'s code path (per graph, per layer, end to end against the PyTorch
    reference) on the stand-in, with CUDA graphs: the engines run their own ONNX graphs, so it must pass."""
    from flamingo_edge.models.checkpoint import DEMO_CHECKPOINT
    from flamingo_edge.tools.compare import compare

    prompts = [PROMPTS["batch_of_one"]()[0], ["the shapes are", frame(7), "what colour"]]
    with installed(engines, demo_export) as standin:
        report = compare(DEMO_CHECKPOINT, demo_export, prompts, backend="tensorrt", engines=engines,
                         cuda_graph=True, new_tokens=8)
    assert report.passed, report.to_dict()
    assert_clean(standin)


def test_the_camera_stream_through_the_tensorrt_backend(engines, demo_export, tmp_path):
    """The real FrameStream (a source thread reading and encoding frames, a worker generating, the few-shot preamble
    from the prefix cache) on the TensorRT backend: the texts of ONNX Runtime's stream, prompt by prompt."""
    import cv2

    from flamingo_edge.runtime.sources import open_source
    from flamingo_edge.runtime.stream import FrameStream

    folder = tmp_path / "frames"
    folder.mkdir()
    for index in range(4):
        cv2.imwrite(str(folder / f"{index:03d}.png"), cv2.cvtColor(frame(400 + index), cv2.COLOR_RGB2BGR))
    few_shot = [frame(500), "a photo of shapes", frame(501), "a photo of colours"]
    prompts = ["a photo of", "the shapes are"]

    def stream(pipeline):
        return [(r.prompt, r.text) for r in FrameStream(pipeline, open_source(f"file://{folder}"), prompts=prompts,
                                                         few_shot=few_shot, max_new_tokens=8, every=1)]

    with Pipeline.open(demo_export, max_context=MAX_CONTEXT) as reference:
        want = stream(reference)
    with installed(engines, demo_export) as standin:
        with Pipeline.open(demo_export, backend="tensorrt", engines=engines, cuda_graph=True) as ours:
            got = stream(ours)
            assert ours.stats["prefix_tokens_reused"] > 0
    assert got == want and len(got) == 4
    assert_clean(standin)


def test_a_profile_tensorrt_refuses_is_an_engine_mismatch(engines, demo_export):
    """TensorRT 8.5 and 10.3 raise RuntimeError from set_optimization_profile_async where later releases return
    False: either way the user gets EngineMismatchError, and nothing stays allocated."""
    from flamingo_edge.errors import EngineMismatchError
    from trt_standin.tensorrt_module import Context

    def refuse(self, profile_index, stream):
        raise RuntimeError("profile index 1 is out of range")

    with installed(engines, demo_export) as standin:
        with mock.patch.object(Context, "set_optimization_profile_async", refuse), \
                pytest.raises(EngineMismatchError, match="could not set up optimization profile 0.*out of range"):
            Pipeline.open(demo_export, backend="tensorrt", engines=engines)
    assert sum(standin.cuda.live().values()) == 0, standin.cuda.live()


@pytest.mark.parametrize("failing", [1, 9, 40])
def test_an_open_that_fails_part_way_frees_what_it_allocated(engines, demo_export, failing):
    """Device memory running out at the n-th allocation (in the first session, or after some sessions opened): a
    CudaError, and no buffer, pinned buffer or stream left behind."""
    from flamingo_edge.runtime.cuda import CudaError
    from trt_standin.cuda_runtime import cudaError_t

    with installed(engines, demo_export) as standin:
        allocate, calls = standin.cuda._allocate, []

        def running_out(size, kind, call):
            calls.append(call)
            if len(calls) == failing:
                return cudaError_t.cudaErrorMemoryAllocation, None
            return allocate(size, kind, call)

        with mock.patch.object(standin.cuda, "_allocate", running_out), \
                pytest.raises(CudaError, match="cudaErrorMemoryAllocation"):
            Pipeline.open(demo_export, backend="tensorrt", engines=engines)
    assert sum(standin.cuda.live().values()) == 0, standin.cuda.live()

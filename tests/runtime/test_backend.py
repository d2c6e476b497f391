"""Backends on small real ONNX graphs built here: outputs by name, every feed check, open-time checks, devices."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper

from flamingo_edge.errors import EngineBuildError, FeatureUnavailableError, GraphContractError, UsageError
from flamingo_edge.graphs import GraphSpec, TensorSpec
from flamingo_edge.runtime.backend import RecordingSession, check_feed
from flamingo_edge.runtime.sessions import open_session

# toy: y = 2 x, next_ids = ids + 1, negated = -past, mask_out = mask; "free" [B, M*L] is fed and ignored.
SPEC = GraphSpec(
    "toy",
    inputs=(
        TensorSpec("x", "float32", ("B", 4)),
        TensorSpec("ids", "int64", ("B", "S")),
        TensorSpec("past", "float32", ("B", 2, "P", 3)),
        TensorSpec("mask", "int64", ("B", "P+S")),
        TensorSpec("free", "float32", ("B", "M*L")),
    ),
    outputs=(
        TensorSpec("y", "float32", ("B", 4)),
        TensorSpec("next_ids", "int64", ("B", "S")),
        TensorSpec("negated", "float32", ("B", 2, "P", 3)),
        TensorSpec("mask_out", "int64", ("B", "P+S")),
    ),
)
_ONNX_TYPES = {"float32": TensorProto.FLOAT, "int64": TensorProto.INT64, "int32": TensorProto.INT32}


def _value_info(tensor: TensorSpec):
    return helper.make_tensor_value_info(tensor.name, _ONNX_TYPES[tensor.dtype], list(tensor.dims))


def write_toy(path, spec: GraphSpec = SPEC):
    """The toy graph with the inputs and outputs that `spec` declares (which may differ from SPEC)."""
    names = {tensor.name for tensor in spec.inputs}
    nodes = [
        helper.make_node("Mul", ["x", "two"], ["y"]),
        helper.make_node("Add", ["ids", "one"], ["next_ids"]),
        helper.make_node("Neg", ["past"], ["negated"]),
        helper.make_node("Identity", ["mask"], ["mask_out"]),
    ]
    nodes = [node for node in nodes if set(node.input) - {"two", "one"} <= names]
    initializers = [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
                    helper.make_tensor("one", _ONNX_TYPES[next((t.dtype for t in spec.inputs if t.name == "ids"),
                                                               "int64")], [], [1])]
    used = {name for node in nodes for name in node.input}
    initializers = [tensor for tensor in initializers if tensor.name in used]
    graph = helper.make_graph(nodes, spec.name, [_value_info(t) for t in spec.inputs],
                              [_value_info(t) for t in spec.outputs], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def toy_path(tmp_path_factory):
    return write_toy(tmp_path_factory.mktemp("toy") / "toy.onnx")


def make_feed(rng, *, batch=2, past=3, new=2, free=5) -> dict[str, np.ndarray]:
    return {
        "x": rng.standard_normal((batch, 4)).astype(np.float32),
        "ids": rng.integers(0, 100, size=(batch, new), dtype=np.int64),
        "past": rng.standard_normal((batch, 2, past, 3)).astype(np.float32),
        "mask": rng.integers(0, 2, size=(batch, past + new), dtype=np.int64),
        "free": rng.standard_normal((batch, free)).astype(np.float32),
    }


def test_onnxruntime_threads_stop_spinning_after_each_run(toy_path):
    """A pipeline runs its sessions one after another; a session whose threads kept spinning would take the cores
    from the next one (benchmarks/README.md measured 2.8x the time to first token on 2 cores)."""
    import onnxruntime

    with open_session(toy_path, SPEC) as session:
        options = session.session.get_session_options()
        assert options.get_session_config_entry("session.force_spinning_stop") == "1"
        assert options.use_per_session_threads  # no process-wide pool: other sessions in the process are unaffected
    onnxruntime.InferenceSession(str(toy_path), providers=["CPUExecutionProvider"])  # the user's own session


def test_outputs_by_name_equal_numpy_and_are_not_reused(toy_path, seed):
    rng = np.random.default_rng(seed)
    with open_session(toy_path, SPEC) as session:
        assert session.spec is SPEC
        feed = make_feed(rng, past=0)  # P = 0: an empty past is a valid input
        outputs = session.run(feed)
        kept = {name: value.copy() for name, value in outputs.items()}
        assert list(outputs) == SPEC.output_names
        np.testing.assert_array_equal(outputs["y"], feed["x"] * 2)
        np.testing.assert_array_equal(outputs["next_ids"], feed["ids"] + 1)
        assert outputs["negated"].shape == (2, 2, 0, 3)
        np.testing.assert_array_equal(outputs["mask_out"], feed["mask"])
        strided = make_feed(rng, batch=3)
        strided["x"] = rng.standard_normal((3, 8)).astype(np.float32)[:, ::2]  # a non-contiguous view
        second = session.run(strided)
        np.testing.assert_array_equal(second["y"], strided["x"] * 2)
        np.testing.assert_array_equal(second["negated"], -strided["past"])
        for name, value in kept.items():  # the first run's arrays were not overwritten by the second
            np.testing.assert_array_equal(outputs[name], value)


def _broken(feed, **changes):
    return {**feed, **changes}


@pytest.mark.parametrize("change, message", [
    (lambda f: _broken(f, ids=f["ids"].astype(np.int32)), r"^toy: input 'ids' has dtype int32; expected int64$"),
    (lambda f: {k: v for k, v in f.items() if k not in ("mask", "x")}, r"toy: missing inputs \['x', 'mask'\]"),
    (lambda f: _broken(f, extra=f["x"]), r"toy: unknown inputs \['extra'\]; the graph takes \['x', 'ids'"),
    (lambda f: _broken(f, x=f["x"][0]), r"toy: input 'x' has shape \(4,\); expected rank 2 \[B, 4\]"),
    (lambda f: _broken(f, x=np.zeros((2, 5), np.float32)), r"toy: input 'x' has shape \(2, 5\); dim 1 must be 4"),
    (lambda f: _broken(f, ids=np.zeros((3, 2), np.int64)),
     r"toy: input 'ids' has B = 3 \(dim 0\); input 'x' dim 0 has B = 2"),
    (lambda f: _broken(f, mask=np.zeros((2, 6), np.int64)),
     r"toy: input 'mask' dim 1 has P\+S = 6; expected 3 \(P, input 'past' dim 2\) \+ 2 \(S, input 'ids' dim 1\) = 5"),
    (lambda f: _broken(f, x=f["x"].tolist()), r"toy: input 'x' is a list; expected a numpy array"),
])
def test_check_feed_refuses(toy_path, seed, change, message):
    feed = make_feed(np.random.default_rng(seed))
    check_feed(SPEC, feed)  # the unbroken feed passes
    with pytest.raises(GraphContractError, match=message):
        check_feed(SPEC, change(feed))
    with open_session(toy_path, SPEC) as session, pytest.raises(GraphContractError, match=message):
        session.run(change(feed))


def test_check_feed_lists_every_problem(seed):
    feed = make_feed(np.random.default_rng(seed))
    broken = _broken(feed, ids=feed["ids"].astype(np.int32), x=np.zeros((2, 5), np.float32))
    with pytest.raises(GraphContractError, match=r"^toy: input 'x' has shape \(2, 5\); dim 1 must be 4; "
                                                 r"toy: input 'ids' has dtype int32; expected int64$"):
        check_feed(SPEC, broken)


def test_composite_product_dims_are_free(seed):
    for free in (0, 1, 7):
        check_feed(SPEC, make_feed(np.random.default_rng(seed), free=free))


def _respec(**replaced: TensorSpec) -> GraphSpec:
    """SPEC with some inputs or outputs replaced, by name."""
    return GraphSpec(SPEC.name, tuple(replaced.get(t.name, t) for t in SPEC.inputs),
                     tuple(replaced.get(t.name, t) for t in SPEC.outputs))


@pytest.mark.parametrize("graph_spec, message", [
    (_respec(ids=TensorSpec("ids", "int32", ("B", "S")), next_ids=TensorSpec("next_ids", "int32", ("B", "S"))),
     r"input 'ids' is int32, expected int64; output 'next_ids' is int32, expected int64"),
    (GraphSpec("toy", tuple(TensorSpec("pixels" if t.name == "x" else t.name, t.dtype, t.dims) for t in SPEC.inputs),
               SPEC.outputs[1:]),
     r"input 'x' is missing; .*unexpected input 'pixels'"),
    (_respec(x=TensorSpec("x", "float32", ("B", 5))), r"input 'x' has shape \[B, 5\], expected \[B, 4\]"),
    (_respec(past=TensorSpec("past", "float32", ("B", 2, "P"))), r"input 'past' has rank 3 \[B, 2, P\], expected 4"),
])
def test_graph_that_differs_from_the_spec_is_refused_at_open(tmp_path, graph_spec, message):
    path = write_toy(tmp_path / "other.onnx", graph_spec)
    with pytest.raises(GraphContractError, match=rf"toy: .*other\.onnx does not match the toy graph contract: "
                                                 rf"{message}.*re-run `flamingo-edge export`"):
        open_session(path, SPEC)


def test_missing_or_corrupt_graph_file(tmp_path):
    with pytest.raises(GraphContractError, match=r"toy: graph file .*nope\.onnx does not exist; re-run `flamingo"):
        open_session(tmp_path / "nope.onnx", SPEC)
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"this is not a protobuf")
    with pytest.raises(GraphContractError, match=r"toy: ONNX Runtime cannot load .*corrupt\.onnx .*re-run `flamingo"):
        open_session(corrupt, SPEC)


def test_unknown_and_unimplemented_backends_and_devices(toy_path):
    with pytest.raises(FeatureUnavailableError, match=r"unknown runtime backend 'tflite'; .*'onnxruntime', 'tensor"):
        open_session(toy_path, SPEC, "tflite")
    with pytest.raises(EngineBuildError, match="is not a complete engines folder"):  # an .onnx is no engine
        open_session(toy_path, SPEC, "tensorrt")
    with pytest.raises(FeatureUnavailableError, match="TensorRT engines run on the GPU only"):
        open_session(toy_path, SPEC, "tensorrt", device="cpu")
    with pytest.raises(FeatureUnavailableError, match=r"unknown device 'gpu'; .*'auto', 'cpu', 'cuda'"):
        open_session(toy_path, SPEC, device="gpu")


def test_cuda_device_on_this_onnxruntime(toy_path, seed):
    """A CPU build of onnxruntime refuses device 'cuda'; a GPU build must really run on CUDA (through IO binding)."""
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(FeatureUnavailableError, match=r"device 'cuda' needs onnxruntime with the CUDAExecution"
                                                          r"Provider; .*install onnxruntime-gpu"):
            open_session(toy_path, SPEC, device="cuda")
        return
    feed = make_feed(np.random.default_rng(seed))
    with open_session(toy_path, SPEC, device="cuda") as session:
        assert session.on_cuda
        outputs = session.run(feed)
    np.testing.assert_allclose(outputs["y"], feed["x"] * 2)
    np.testing.assert_array_equal(outputs["next_ids"], feed["ids"] + 1)


@pytest.fixture
def cuda_listed_but_unloadable(monkeypatch):
    """What onnxruntime-gpu does without working CUDA libraries: CUDA is listed, the session falls back to the CPU."""
    providers = onnxruntime.get_available_providers()
    if "CUDAExecutionProvider" in providers:
        pytest.skip("CUDA is really available here; the fallback is simulated on CPU builds only")
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", *providers])


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider' is not in available provider")
def test_silent_cuda_fallback_is_refused_or_logged(toy_path, seed, cuda_listed_but_unloadable, caplog):
    with pytest.raises(FeatureUnavailableError, match=r"toy: device 'cuda' was asked for, but ONNX Runtime could "
                                                      r"not load its CUDAExecutionProvider \(it runs on \['CPU"):
        open_session(toy_path, SPEC, device="cuda")
    feed = make_feed(np.random.default_rng(seed))
    with caplog.at_level(logging.WARNING), open_session(toy_path, SPEC, device="auto") as session:
        assert not session.on_cuda
        np.testing.assert_array_equal(session.run(feed)["y"], feed["x"] * 2)
    assert "toy: ONNX Runtime could not load CUDA and runs on ['CPUExecutionProvider']" in caplog.text


def test_closed_session_refuses_to_run(toy_path, seed):
    session = open_session(toy_path, SPEC)
    session.close()
    session.close()  # twice is harmless
    with pytest.raises(UsageError, match="toy: this session was closed"):
        session.run(make_feed(np.random.default_rng(seed)))


def test_a_run_times_itself(toy_path, seed):
    with open_session(toy_path, SPEC) as session:
        assert session.last_run_seconds == 0.0
        session.run(make_feed(np.random.default_rng(seed)))
        assert session.last_run_seconds > 0.0


def test_recording_keeps_every_feed_or_the_first_of_each_kind(toy_path, seed):
    """Calibration keeps every feed; compare the first of each kind (which inputs are empty: prefill vs decode)."""
    rng = np.random.default_rng(seed)
    feeds = [make_feed(rng, past=0), make_feed(rng, past=2), make_feed(rng, past=0), make_feed(rng, past=3)]
    with open_session(toy_path, SPEC) as session:
        every, first = RecordingSession(session), RecordingSession(session, first_per_kind=True)
        for feed in feeds:
            np.testing.assert_array_equal(every.run(feed)["y"], feed["x"] * 2)
            first.run(feed)
        assert len(every.feeds) == 4 and len(first.feeds) == 2
        np.testing.assert_array_equal(first.feeds[1]["past"], feeds[1]["past"])
        feeds[0]["x"][:] = 0  # the recording holds copies
        assert every.feeds[0]["x"].any()


def test_runtime_modules_import_neither_torch_nor_transformers():
    code = (
        "import sys\n"
        "import flamingo_edge.runtime.backend, flamingo_edge.runtime.onnxruntime_backend\n"
        "import flamingo_edge.runtime.kv_cache, flamingo_edge.runtime.sampling\n"
        "heavy = [m for m in ('torch', 'transformers', 'tensorrt') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

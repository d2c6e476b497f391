"""`flamingo-edge triton-repo` (serving/repository.py): config.pbtxt files read back by an independent reader and by
Triton's own schema (tritonclient's model_config_pb2), the graph models' inputs and outputs checked against the
graph contract, the .onnx files (ONNX Runtime's view of them) and the engines' profiles, and the --python-only
repository loaded and run by the real tritonserver PyTriton bundles: its captions equal `Pipeline.complete` run one
prompt at a time on the same export.

The server tests need a serving venv with nvidia-pytriton and tritonclient (tests/serving/build.sh makes .venv-serve;
FLAMINGO_EDGE_SERVE_VENV names another). The onnxruntime and tensorrt_plan repositories cannot run here: that
tritonserver has the Python backend only.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from flamingo_edge.artifacts import read_export_record, sha256_of
from flamingo_edge.cli.main import main
from flamingo_edge.config import FlamingoConfig
from flamingo_edge.engines.profiles import ShapeLimits, graph_profiles
from flamingo_edge.errors import EngineMismatchError, UsageError
from flamingo_edge.graphs import GRAPH_NAMES, build_graphs
from flamingo_edge.manifest import MANIFEST_VERSION, EngineEntry, Manifest
from flamingo_edge.serving.repository import (SETTINGS_FILE, Symbol, format_pbtxt, read_settings,
                                              write_repository)
from serving_venv import require_serving_venv

ROOT = Path(__file__).resolve().parents[2]
ORT_TYPES = {"tensor(float)": "TYPE_FP32", "tensor(int64)": "TYPE_INT64", "tensor(int32)": "TYPE_INT32"}
LIMITS = ShapeLimits(max_batch=2, max_prompt=32, max_context=48, max_images=3)


# ------------------------------------------------------------------------ a text protobuf reader (not the writer's)

_TOKEN = re.compile(r'\s*(?:("(?:[^"\\]|\\.)*")|([-+]?\d[\w.+-]*)|([A-Za-z_]\w*)|([{}\[\]:,]))')


def _unescape(quoted: str) -> str:
    return re.sub(r"\\([0-7]{3}|.)", lambda m: chr(int(m[1], 8)) if len(m[1]) == 3 else {"n": "\n"}.get(m[1], m[1]),
                  quoted[1:-1])


def parse_pbtxt(text: str) -> dict:
    """Protobuf text format as dicts and lists: what format_pbtxt writes (bare words come back as Symbol)."""
    tokens, position = [], 0
    while text[position:].strip():
        match = _TOKEN.match(text, position)
        assert match, f"cannot read {text[position:position + 30]!r}"
        tokens.append(match)
        position = match.end()
    tokens.append(None)
    index = 0

    def take(expected=None):
        nonlocal index
        token = tokens[index]
        index += 1
        assert expected is None or (token and token[4] == expected), f"expected {expected!r} at token {index}"
        return token

    def scalar(token):
        string, number, word, _ = token.groups()
        if string is not None:
            return _unescape(string)
        if number is not None:
            return float(number) if re.search(r"[.eE]", number) else int(number)
        return {"true": True, "false": False}.get(word, Symbol(word) if word else None)

    def value():
        if at("{"):
            take("{")
            return message("}")
        return scalar(take())

    def at(punctuation):
        return tokens[index] is not None and tokens[index][4] == punctuation

    def message(end):
        fields = {}
        while not (at(end) if end else tokens[index] is None):
            key = take()[3]
            assert key and key not in fields, f"bad or repeated field {key!r}"
            if at(":"):
                take(":")
            if at("["):
                take("[")
                fields[key] = []
                while not at("]"):
                    fields[key].append(value())
                    if at(","):
                        take(",")
                take("]")
            else:
                fields[key] = value()
        if end is not None:
            take(end)
        return fields

    return message(None)


def read_config(path: Path) -> dict:
    config = parse_pbtxt(path.read_text(encoding="utf-8"))
    assert format_pbtxt(config) + "\n" == path.read_text(encoding="utf-8")  # written in the writer's one form
    return config


def test_text_protobuf_round_trips_escapes_nesting_and_types():
    message = {"name": 'a "quoted" \\ name\nwith ünïcode and \x01', "count": 3, "negative": -1, "scale": 1.5e-05,
               "flag": True, "off": False, "kind": Symbol("KIND_GPU"), "dims": [-1, 3, 96], "names": ["0", "1"],
               "empty": {}, "nested": {"inner": {"deep": Symbol("TYPE_FP32")}},
               "items": [{"name": "a", "dims": [1]}, {"name": "b", "optional": True}]}
    text = format_pbtxt(message)
    assert parse_pbtxt(text) == message
    assert "\\001" in text and '\\"quoted\\"' in text and "\\\\" in text and "ünïcode" in text
    back = parse_pbtxt(text)
    assert type(back["kind"]) is Symbol and type(back["name"]) is str and back["flag"] is True
    with pytest.raises(TypeError, match="no text protobuf form for NoneType"):
        format_pbtxt({"bad": None})


# -------------------------------------------------------------------------------------------------- the contract


def _specs(export_dir: Path):
    return build_graphs(FlamingoConfig.from_dict(read_export_record(export_dir).config))


def _check_against_contract(config: dict, spec, dtypes: dict | None = None) -> None:
    """A graph model's config: the contract's inputs and outputs, in order, dtypes (or the engine's), -1 where
    dynamic; max_batch_size 0 (dims include the batch)."""
    dtypes = dtypes or {}
    assert config["name"] == spec.name and config["max_batch_size"] == 0
    for declared, contract in ((config["input"], spec.inputs), (config["output"], spec.outputs)):
        assert [t["name"] for t in declared] == [t.name for t in contract]
        for tensor, want in zip(declared, contract):
            dtype = dtypes.get(want.name, want.dtype)
            assert tensor["data_type"] == {"float32": "TYPE_FP32", "int64": "TYPE_INT64", "int32": "TYPE_INT32"}[dtype]
            assert tensor["dims"] == [d if isinstance(d, int) else -1 for d in want.dims], want.name


def _check_against_onnx(config: dict, onnx_path: Path) -> None:
    """The config against the graph file as ONNX Runtime reads it (an independent view of names, dtypes, dims)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for declared, actual in ((config["input"], session.get_inputs()), (config["output"], session.get_outputs())):
        assert [t["name"] for t in declared] == [a.name for a in actual]
        for tensor, arg in zip(declared, actual):
            assert tensor["data_type"] == ORT_TYPES[arg.type], arg.name
            assert tensor["dims"] == [d if isinstance(d, int) else -1 for d in arg.shape], arg.name


def test_onnxruntime_repository_follows_the_contract_and_the_onnx_files(demo_export, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert main(["triton-repo", str(demo_export), "-o", str(repo)]) == 0
    assert "decoder    onnxruntime" in capsys.readouterr().out
    record, specs = read_export_record(demo_export), _specs(demo_export)
    assert sorted(p.name for p in repo.iterdir()) == sorted([*GRAPH_NAMES, "flamingo"])
    for name in GRAPH_NAMES:
        config = read_config(repo / name / "config.pbtxt")
        assert config["backend"] == "onnxruntime" and "instance_group" not in config  # Triton's default placement
        _check_against_contract(config, specs[name])
        model = repo / name / "1" / "model.onnx"
        assert sha256_of(model) == record.graphs[name].sha256 and not (repo / name / "1" / "model.py").exists()
        _check_against_onnx(config, model)
    flamingo = read_config(repo / "flamingo" / "config.pbtxt")
    assert flamingo["backend"] == "python" and flamingo["instance_group"] == [{"kind": "KIND_CPU", "count": 1}]
    assert {t["name"]: (t["data_type"], t["dims"], t.get("optional", False)) for t in flamingo["input"]} == {
        "prompt": ("TYPE_STRING", [1], False), "image": ("TYPE_STRING", [-1], True),
        "max_new_tokens": ("TYPE_INT32", [1], True), "temperature": ("TYPE_FP32", [1], True),
        "seed": ("TYPE_INT64", [1], True)}
    assert [(t["name"], t["data_type"], t["dims"]) for t in flamingo["output"]] == [
        ("text", "TYPE_STRING", [1]), ("token_ids", "TYPE_INT64", [-1])]
    version = repo / "flamingo" / "1"
    settings = read_settings(version)
    assert settings.models == {n: n for n in GRAPH_NAMES} and settings.input_dtypes == {}
    assert not settings.one_graph_at_a_time  # the onnxruntime backend may run the graphs on a GPU
    assert (settings.max_context, settings.max_prompt, settings.max_batch) == (
        FlamingoConfig.from_dict(record.config).decoder.max_positions, None, 8)
    assert all((version / file).read_bytes() == (demo_export / file).read_bytes() for file in record.tokenizer_files)
    import flamingo_edge.serving.triton_models as templates

    assert (version / "model.py").read_bytes() == (Path(templates.__file__).parent / "flamingo.py").read_bytes()


def fake_engines(export_dir: Path, folder: Path, *, flavour: str = "tensorrt", version: str = "10.3.0.26") -> Path:
    """An engines folder as `flamingo-edge build` writes it (engines/build.py: the same manifest fields, the real
    profiles of graph_profiles), with placeholder bytes for the engines, which nothing here can build or load."""
    record = read_export_record(export_dir)
    config = FlamingoConfig.from_dict(record.config)
    specs = build_graphs(config)
    manifest = Manifest(MANIFEST_VERSION, str(export_dir.resolve()), record.precision,
                        {"flavour": flavour, "version": version}, "datacenter", "SM90", asdict(LIMITS), None, {},
                        device="NVIDIA H100")
    folder.mkdir()
    for name in GRAPH_NAMES:
        profiles = graph_profiles(specs[name], LIMITS, config.visual_tokens_per_image)
        file = folder / f"{name}.engine"
        file.write_bytes(f"placeholder {name} engine".encode())
        manifest.profiles[name] = [{k: [list(s) for s in v] for k, v in p.items()} for p in profiles]
        manifest.engines[name] = asdict(EngineEntry(file.name, sha256_of(file), record.graphs[name].sha256,
                                                    file.stat().st_size, 1.0))
    (folder / "manifest.json").write_text(json.dumps(asdict(manifest), indent=2))
    return folder


@pytest.mark.parametrize("version, int_type", [("10.3.0.26", "int64"), ("8.6.2.3", "int32")])
def test_tensorrt_plan_repository_follows_the_contract_and_the_engine_profiles(demo_export, tmp_path, version,
                                                                               int_type):
    """TensorRT before 10 imports int64 inputs as int32: the configs say so and the flamingo model casts to it."""
    engines = fake_engines(demo_export, tmp_path / "engines", version=version)
    repo = tmp_path / "repo"
    assert main(["triton-repo", str(demo_export), "-o", str(repo), "--engines", str(engines), "--max-batch",
                 "4"]) == 0
    manifest = json.loads((engines / "manifest.json").read_text())
    specs = _specs(demo_export)
    settings = read_settings(repo / "flamingo" / "1")
    for name in GRAPH_NAMES:
        config = read_config(repo / name / "config.pbtxt")
        assert config["platform"] == "tensorrt_plan" and "backend" not in config
        casts = {t.name: "int32" for t in specs[name].inputs if t.dtype == "int64" and int_type == "int32"}
        _check_against_contract(config, specs[name], casts)
        assert settings.input_dtypes.get(name, {}) == casts
        assert (repo / name / "1" / "model.plan").read_bytes() == (engines / f"{name}.engine").read_bytes()
        for profile in manifest["profiles"][name]:  # every profile shape fits the config's dims
            for tensor in config["input"]:
                for shape in profile[tensor["name"]]:
                    assert len(shape) == len(tensor["dims"])
                    assert all(d == -1 or d == s for d, s in zip(tensor["dims"], shape)), (name, tensor["name"])
        profiles = len(manifest["profiles"][name])
        if profiles > 1:  # the decoder: prefill and decode; Triton would use profile 0 alone otherwise
            assert config["instance_group"] == [{"kind": "KIND_GPU", "count": 1, "profile": ["0", "1"]}]
        else:
            assert "instance_group" not in config
    assert (settings.max_context, settings.max_images, settings.max_prompt, settings.max_batch) == (48, 3, 32, 2)
    assert settings.engines == str(engines.resolve())


def test_what_triton_cannot_serve_is_refused(demo_export, tmp_path, capsys):
    engines = fake_engines(demo_export, tmp_path / "engines")
    assert main(["triton-repo", str(demo_export), "-o", str(tmp_path / "r"), "--engines", str(engines),
                 "--python-only"]) == 2
    assert "--engines and --python-only exclude each other" in capsys.readouterr().err
    rtx = fake_engines(demo_export, tmp_path / "rtx", flavour="tensorrt_rtx", version="1.7.1.116")
    with pytest.raises(UsageError, match="holds tensorrt_rtx engines .* Triton's tensorrt_plan backend loads "
                                         "TensorRT engines only: build them with --target datacenter"):
        write_repository(demo_export, tmp_path / "r", engines=rtx)
    manifest = json.loads((engines / "manifest.json").read_text())
    manifest["engines"]["decoder"]["onnx_sha256"] = "0" * 64  # built from another export's decoder
    (engines / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineMismatchError, match=r"engines for \['decoder'\] .* were built from other ONNX graphs"):
        write_repository(demo_export, tmp_path / "r", engines=engines)
    with pytest.raises(UsageError, match="max_batch must be an integer >= 1; got 0"):
        write_repository(demo_export, tmp_path / "r", max_batch=0)
    (tmp_path / "taken").mkdir()
    with pytest.raises(UsageError, match="taken already exists"):
        write_repository(demo_export, tmp_path / "taken")
    assert not (tmp_path / "r").exists()
    manifest["engines"]["decoder"]["onnx_sha256"] = read_export_record(demo_export).graphs["decoder"].sha256
    manifest["profiles"]["vision"][0]["images"] = manifest["profiles"]["vision"][0].pop("pixel_values")
    (engines / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match=r"the vision engine's profiles name \['images'\], the contract "
                                         r"\['pixel_values'\]; rebuild the engines"):
        write_repository(demo_export, tmp_path / "r", engines=engines)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("quantization, message", [
    ({"encoding": "MatMulNBits", "weights": {"decoder": {"fused_attention": 3}}},
     "its decoder writes the KV cache in place .* quantize the fp32 export with --no-fusions"),
    ({"encoding": "TRT_INT4DequantizeLinear"}, "ONNX Runtime cannot run: build engines from it and pass them with "
                                               "--engines"),
])
def test_exports_triton_cannot_run_as_onnx_are_refused(demo_export, tmp_path, quantization, message):
    export = tmp_path / "int4"
    shutil.copytree(demo_export, export)
    record = json.loads((export / "export.json").read_text())
    (export / "export.json").write_text(json.dumps({**record, "precision": "int4", "quantization": quantization}))
    with pytest.raises(UsageError, match=message):
        write_repository(export, tmp_path / "repo")


def test_the_flamingo_models_settings_are_checked(demo_export, tmp_path):
    write_repository(demo_export, tmp_path / "repo")
    version = tmp_path / "repo" / "flamingo" / "1"
    data = json.loads((version / SETTINGS_FILE).read_text())
    (version / SETTINGS_FILE).write_text(json.dumps({**data, "surprise": True}))
    with pytest.raises(UsageError, match="flamingo.json: expected an object with the keys .* re-run flamingo-edge "
                                         "triton-repo"):
        read_settings(version)
    (version / SETTINGS_FILE).write_text(json.dumps({**data, "contract_version": 1}))
    with pytest.raises(UsageError, match="settings v1 for graph contract v1; this flamingo-edge reads v1, contract v2"):
        read_settings(version)


# ------------------------------------------------------------------------------------- the serving venv (Triton)


@pytest.fixture(scope="module")
def venv() -> Path:
    """The serving venv (PyTriton's tritonserver, tritonclient); skipped without one, except in CI."""
    return require_serving_venv()


def _venv_python(venv: Path, code: str, *args: str, timeout: float = 120) -> str:
    result = subprocess.run([str(venv / "bin" / "python"), "-c", code, *args], capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_every_config_parses_with_tritons_own_schema(demo_export, tmp_path, venv):
    repos = [tmp_path / "ort", tmp_path / "python", tmp_path / "trt10", tmp_path / "trt8"]
    write_repository(demo_export, repos[0])
    write_repository(demo_export, repos[1], python_only=True)
    for repo, version in zip(repos[2:], ("10.3.0.26", "8.6.2.3")):
        write_repository(demo_export, repo, engines=fake_engines(demo_export, tmp_path / f"e{version}",
                                                                 version=version))
    code = ("import json, sys; from google.protobuf import text_format, json_format; "
            "from tritonclient.grpc import model_config_pb2 as pb; print(json.dumps({p: json_format.MessageToDict("
            "text_format.Parse(open(p).read(), pb.ModelConfig())) for p in sys.argv[1:]}))")
    paths = [str(path) for repo in repos for path in sorted(repo.glob("*/config.pbtxt"))]
    parsed = json.loads(_venv_python(venv, code, *paths))
    assert len(parsed) == 20
    decoder = parsed[str(repos[3] / "decoder" / "config.pbtxt")]
    assert decoder["platform"] == "tensorrt_plan" and decoder["input"][0]["dataType"] == "TYPE_INT32"
    assert decoder["instanceGroup"] == [{"kind": "KIND_GPU", "count": 1, "profile": ["0", "1"]}]
    vision = parsed[str(repos[1] / "vision" / "config.pbtxt")]
    assert vision["backend"] == "python" and vision["input"][0]["dims"] == ["-1", "3", "96", "96"]


def _free_ports(count: int) -> list[int]:
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def _pids_naming(text: str) -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if text.encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
    return pids


@contextlib.contextmanager
def tritonserver(repo: Path, venv: Path, work: Path):
    """PyTriton's bundled tritonserver on `repo`, as docs/triton_repo.md runs it, bound to 127.0.0.1; yields its
    (http, grpc) ports; stopped (with its backend stubs) on exit.

    The stub of the venv's Python goes into a copy of the backends folder; the venv's bin comes first on PATH (the
    stub's Python finds its site-packages from the `python3` there); the Python's own libdir first on
    LD_LIBRARY_PATH (the stub would load the system's libpython3.X otherwise: docs/triton_repo.md). The stub ignores
    PYTHONPATH, so an overlay venv puts this working tree before the serving venv's packages.
    """
    site = next(venv.glob("lib/python3.*/site-packages"))
    pytriton = site / "pytriton" / "tritonserver"
    minor = site.parent.name.removeprefix("python")
    backends = work / "backends"
    shutil.copytree(pytriton / "backends", backends)
    shutil.copy2(pytriton / "python_backend_stubs" / minor / "triton_python_backend_stub", backends / "python")
    overlay = work / "overlay"
    subprocess.run([str(venv / "bin" / "python"), "-m", "venv", "--without-pip", str(overlay)], check=True)
    (next(overlay.glob("lib/python3.*/site-packages")) / "flamingo_edge_tree.pth").write_text(
        f"{ROOT}\nimport site; site.addsitedir({str(site)!r})\n")
    libdir = _venv_python(venv, "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))").strip()
    env = {**os.environ, "PATH": f"{overlay / 'bin'}:{os.environ['PATH']}",
           "LD_LIBRARY_PATH": ":".join(filter(None, [libdir, str(site / "nvidia_pytriton.libs"),
                                                     os.environ.get("LD_LIBRARY_PATH")]))}
    http, grpc, metrics = _free_ports(3)
    log = work / "tritonserver.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [str(pytriton / "bin" / "tritonserver"), f"--model-repository={repo}", f"--backend-directory={backends}",
             "--http-address=127.0.0.1", f"--http-port={http}", "--grpc-address=127.0.0.1", f"--grpc-port={grpc}",
             "--metrics-address=127.0.0.1", f"--metrics-port={metrics}", "--allow-gpu-metrics=false",
             "--exit-timeout-secs=5"], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, f"tritonserver exited:\n{log.read_text(errors='replace')[-4000:]}"
            assert time.monotonic() < deadline, f"not ready in 120 s:\n{log.read_text(errors='replace')[-4000:]}"
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=2) as response:
                    if response.status == 200:
                        break
            time.sleep(0.3)
        yield http, grpc
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        for pid in _pids_naming(str(backends)):  # stubs left behind: ours, named by our backends folder
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


CLIENT = r"""
import concurrent.futures, json, sys
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

http, grpc, requests = int(sys.argv[1]), int(sys.argv[2]), json.load(open(sys.argv[3]))

def send(request):
    module = httpclient if request["protocol"] == "http" else grpcclient
    client = module.InferenceServerClient(f"127.0.0.1:{http if request['protocol'] == 'http' else grpc}")
    tensors = [("prompt", np.array([request["prompt"].encode()], object), "BYTES")]
    if request["images"]:
        tensors.append(("image", np.array([open(p, "rb").read() for p in request["images"]], object), "BYTES"))
    for name, (value, dtype) in request["settings"].items():
        kind = {"INT32": np.int32, "FP32": np.float32, "INT64": np.int64}[dtype]
        tensors.append((name, np.array([value], kind), dtype))
    inputs = []
    for name, value, dtype in tensors:
        inputs.append(module.InferInput(name, list(value.shape), dtype))
        inputs[-1].set_data_from_numpy(value)
    try:
        result = client.infer("flamingo", inputs)
        return {"text": result.as_numpy("text")[0].decode(), "token_ids": result.as_numpy("token_ids").tolist()}
    except InferenceServerException as error:
        return {"status": str(error.status()), "error": error.message()}
    finally:
        client.close()

with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:  # all at once: they share the decode batch
    print(json.dumps(list(pool.map(send, requests))))
"""


@pytest.fixture(scope="module")
def external_data_export(tmp_path_factory):
    """The demo checkpoint exported with every graph's weights in a .onnx.data file beside it."""
    from flamingo_edge.export.export import export_all
    from flamingo_edge.models.checkpoint import DEMO_CHECKPOINT

    out = tmp_path_factory.mktemp("external") / "export"
    export_all(DEMO_CHECKPOINT, out, seed=0, external_data_threshold=0)
    return out


def _requests(folder: Path) -> tuple[list[dict], list[list]]:
    """Requests for the server (prompts with `<image>` markers, PNG files) and the same prompts as Pipeline items."""
    import cv2

    from flamingo_edge.demo.scenes import make_scene

    scenes = [make_scene(np.random.default_rng(seed)) for seed in range(4)]
    pngs = []
    for index, scene in enumerate(scenes):
        pngs.append(folder / f"scene{index}.png")
        cv2.imwrite(str(pngs[-1]), cv2.cvtColor(scene.image, cv2.COLOR_RGB2BGR))  # lossless: the same pixels
    greedy = {"max_new_tokens": (12, "INT32")}
    cases = [("<image>caption:", [0], greedy, "grpc"), ("<image>caption:", [1], greedy, "grpc"),
             ("<image>caption:", [2], greedy, "http"), ("<image>question: what colour is the star? answer:", [3],
                                                        greedy, "grpc"),
             ("<image>caption:<image>caption:", [0, 1], greedy, "grpc"), ("caption:", [], {}, "grpc"),
             ("<image>caption:", [3], {"max_new_tokens": (10, "INT32"), "temperature": (0.9, "FP32"),
                                       "seed": (7, "INT64")}, "grpc")]
    requests = [{"prompt": prompt, "images": [str(pngs[i]) for i in images], "settings": settings,
                 "protocol": protocol} for prompt, images, settings, protocol in cases]
    items = []
    for prompt, images, _, _ in cases:
        pieces = prompt.split("<image>")
        row = [pieces[0]]
        for image, piece in zip(images, pieces[1:]):
            row += [scenes[image].image, piece]
        items.append([item for item in row if not (isinstance(item, str) and item == "")])
    return requests, items


def test_python_only_repository_runs_on_the_bundled_tritonserver(external_data_export, tmp_path, venv):
    """Seven requests at once (gRPC and HTTP; one and two images, text only, seeded sampling) get what
    Pipeline.complete gives each alone on the same export; a request with more markers than images is refused."""
    from flamingo_edge.runtime.pipeline import Pipeline

    repo = tmp_path / "repo"
    assert write_repository(external_data_export, repo, python_only=True)["vision"] == "python"
    assert read_settings(repo / "flamingo" / "1").one_graph_at_a_time  # ONNX Runtime on the CPU, as in-process
    record = read_export_record(external_data_export)
    for name in GRAPH_NAMES:  # the .onnx names its data file: it sits next to model.onnx under that name
        assert (repo / name / "1" / record.graphs[name].data_file).is_file()
    requests, items = _requests(tmp_path)
    requests.append({"prompt": "<image><image>caption:", "images": requests[0]["images"], "settings": {},
                     "protocol": "grpc"})
    (tmp_path / "requests.json").write_text(json.dumps(requests))
    (tmp_path / "client.py").write_text(CLIENT)
    with Pipeline.open(external_data_export) as pipeline:
        expected = []
        for request, prompt in zip(requests, items):
            settings = {name: value for name, (value, _) in request["settings"].items()}
            expected.append(pipeline.complete([prompt], **settings)[0])
    with tritonserver(repo, venv, tmp_path) as (http, grpc):
        out = subprocess.run([str(venv / "bin" / "python"), str(tmp_path / "client.py"), str(http), str(grpc),
                              str(tmp_path / "requests.json")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    answers = json.loads(out.stdout)
    for request, answer, completion in zip(requests, answers, expected):
        assert answer == {"text": completion.text, "token_ids": completion.token_ids}, request
    assert all(answer.get("token_ids") for answer in answers[:-1])
    refused = answers[-1]
    assert refused["status"] == "StatusCode.INVALID_ARGUMENT", refused
    assert "PromptError: the prompt has 2 '<image>' markers but 1" in refused["error"]
    assert not _pids_naming(str(tmp_path / "backends"))

"""The memory plan: what a model needs at each precision, and whether it fits a device (`flamingo-edge plan`).

Torch-free and TensorRT-free: it reads a config (an export's record, a checkpoint's config.json, or a public
config.json with no weights) and counts. docs/plan.md gives every figure's source.

    weights     per graph (vision, resampler, xattn_kv, decoder; in the decoder the embedding and LM head apart),
                from the config's parameter counts at the precision's bytes per weight, or the files of an export
    self KV     2 x layers x H x Dh x P x B x 4 bytes (the graph contract's K/V are float32 at every precision)
    cross K/V   2 x gated blocks x Hx x Dh x M x L x B x 4 bytes, plus the runtime's per-image cache (L: every
                visual token of an image; mllama: its T tiles of P tokens)
    activations from the engine profiles' largest shapes (engines/profiles.py): the biggest tensors a graph holds
                at once, per execution context (mllama's vision: attention scores over all T*P8 tokens of an image)
    prefix cache  the runtime's kept prompt prefixes (self-attention K/V), counted full
    runtime     the process and the libraries; on a Jetson the OS and CUDA come off the board's memory first

Two runtimes are modelled: TensorRT engines on a Jetson or a GPU (`tensorrt`), and ONNX Runtime's CPU provider
(`onnxruntime-cpu`), where the prediction is a process's peak RSS and its constants were measured (docs/plan.md).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from flamingo_edge.artifacts import EXPORT_RECORD, read_export_record
from flamingo_edge.config import FlamingoConfig, TiledVisionConfig
from flamingo_edge.config_files import read_config_json
from flamingo_edge.engines.profiles import ShapeLimits
from flamingo_edge.errors import CheckpointError, UsageError
from flamingo_edge.graphs import GRAPH_NAMES
from flamingo_edge.precision import EXPORT_PRECISIONS, Precision

logger = logging.getLogger(__name__)

GIB = 1 << 30
MIB = 1 << 20
FLOAT_BYTES = 4  # the graph contract's float tensors (K/V, features, logits) are float32 at every precision
RUNTIMES = ("tensorrt", "onnxruntime-cpu")
# Most accurate first: the precision `plan` recommends is the first that fits.
PRECISION_ORDER = (Precision.FP32, Precision.FP16, Precision.INT8_WEIGHTS, Precision.INT8, Precision.INT4)
# What `flamingo-edge quantize` converts at each precision (calibration/quantize.py's defaults; a test checks they
# agree): weight-only precisions the language model's graphs, int8 Q/DQ the image side.
WEIGHT_ONLY_GRAPHS = ("xattn_kv", "decoder")
INT8_GRAPHS = ("vision", "resampler", "xattn_kv")
BLOCK_SIZE = {Precision.INT4: 128, Precision.INT8_WEIGHTS: 128}  # weights per fp32 scale
IMAGE_CACHE = 64  # images whose cross K/V the pipeline keeps (Pipeline.open's image_cache_size; a test checks it)
IMAGE_CACHE_BYTES = 1 << 30  # ... and at most these bytes of them (Pipeline.open's image_cache_bytes; a test checks it)
PREFIX_CACHE_BYTES = 64 * MIB  # earlier prompts' self-attention K/V kept for reuse (Pipeline.open's prefix_cache_bytes;
# a test checks it): a process that sees a new single prompt after another fills it (the camera app, serve)


@dataclass(frozen=True)
class Device:
    """Memory one process can use on a board: the total less what JetPack's OS and the CUDA context take."""

    total_gib: float
    usable_gib: float
    note: str


# docs/plan.md gives the sources; Jetson memory is shared by the CPU and the GPU.
DEVICES = {
    "orin-nano-8gb": Device(7.4, 6.0, "Jetson Orin Nano 8 GB"),
    "orin-nx-16gb": Device(14.9, 13.2, "Jetson Orin NX 16 GB"),
    "agx-orin-32gb": Device(29.8, 27.8, "Jetson AGX Orin 32 GB"),
    "agx-orin-64gb": Device(59.6, 57.4, "Jetson AGX Orin 64 GB"),
    "thor": Device(119.2, 116.0, "Jetson AGX Thor 128 GB"),
}
# `build --target` -> the board the plan checks (AGX Orin comes in 32 and 64 GB: the build refuses only what the
# larger cannot hold, and warns when the smaller cannot). RTX and datacenter targets have no board: no check.
BUILD_TARGET_DEVICES = {"orin-nano": ("orin-nano-8gb",), "orin-nx": ("orin-nx-16gb",),
                        "agx-orin": ("agx-orin-64gb", "agx-orin-32gb"), "thor": ("thor",)}

# -- TensorRT on a Jetson: assumptions (docs/plan.md)
TRT_RUNTIME_BYTES = 512 * MIB  # Python, numpy, tokenizers, OpenCV and TensorRT's runtime beyond the CUDA context
TRT_STAGING_COPIES = 2  # an engine I/O tensor has a device buffer and a pinned host buffer, but for the decoder's
# past, which stays on the device (tensorrt_backend.py)

# -- ONNX Runtime CPU: measured (docs/plan.md "Measured on ONNX Runtime CPU"; onnxruntime 1.32, x86-64, glibc)
ORT_PROCESS_BYTES = 55 * MIB  # Python + numpy + onnxruntime + tokenizers + flamingo_edge.runtime, imported
ORT_OPENCV_BYTES = 15 * MIB  # OpenCV, which the runtime imports to read image files and cameras
ORT_SESSION_BYTES = 15 * MIB  # the first session's one-time cost (environment, kernel registry, thread pools)
# RSS per byte of weights as stored, by how ONNX Runtime's CPU kernels hold them. With glibc's mmap threshold held low
# while sessions load (runtime/onnxruntime_backend.py), the originals that MLAS pre-packing (fp32) and MatMulNBits' packing replace go
# back to the system, so both take what they store; fp16 MatMuls run as fp32 (ONNX Runtime folds the inserted Casts
# into fp32 copies, beside the fp16 originals).
ORT_RSS_PER_BYTE = {"float32": 1.0, "float16": 2.8, "nbits": 1.0, "other": 1.0}
ORT_ARENA_SLACK = 2  # the CPU arena grows in powers of two: up to twice the largest activations it ever held


@dataclass(frozen=True)
class GraphParameters:
    """The parameters of one graph by how precisions treat them."""

    matmul: int = 0  # weights of matrix products (what int8 and the weight-only precisions quantize)
    lm_head: int = 0  # the decoder's output projection (a matrix product; weight-only quantizes it by default)
    embedding: int = 0  # the decoder's token embedding (a Gather: stays float)
    other: int = 0  # norms, biases, gates, latents, position tables, the patch convolution

    @property
    def total(self) -> int:
        return self.matmul + self.lm_head + self.embedding + self.other


def _linear(rows: int, cols: int, bias: bool) -> tuple[int, int]:
    """(matrix weights, bias) of one projection."""
    return rows * cols, rows if bias else 0


def _norm(kind: str, dim: int, bias: bool = True) -> int:
    return dim * (2 if kind == "layer" and bias else 1)


def _mlp(kind: str, dim: int, hidden: int, bias: bool) -> tuple[int, int]:
    """(matrix weights, biases) of a SwiGLU (gate, up, down) or plain (up, down) MLP."""
    matrices = 3 if kind == "swiglu" else 2
    biases = (hidden * (matrices - 1) + dim) if bias and kind != "swiglu" else 0
    return matrices * dim * hidden, biases


def _vision(config: FlamingoConfig) -> GraphParameters:
    if config.tiled:
        return _tiled_vision(config.vision)
    v = config.vision
    per_block_matmul = 4 * v.width * v.width + 2 * v.width * v.mlp_width
    per_block_other = 4 * v.width + v.mlp_width + v.width + 4 * v.width  # q/k/v/out and fc biases, two LayerNorms
    stem = v.num_channels * v.patch_size ** 2 * v.width + v.width + v.num_positions * v.width + 2 * v.width
    return GraphParameters(matmul=v.layers * per_block_matmul, other=v.layers * per_block_other + stem)


def _tiled_vision(v: TiledVisionConfig) -> GraphParameters:
    """mllama's tiled ViT (models/mllama_vision.py): local and gated global blocks with bias-free attention, and
    tile/position tables with one row per aspect-ratio id (id 0, padding, included)."""
    width, ratios, tiles, patches = v.hidden_size, v.max_aspect_ratio_id + 1, v.max_num_tiles, v.patches_per_tile
    per_block_matmul = 4 * width * width + 2 * width * v.intermediate_size
    per_block_other = v.intermediate_size + width + 4 * width  # fc1/fc2 biases, two LayerNorms
    stem = (v.num_channels * v.patch_size ** 2 * width + width  # patch convolution (no bias), class embedding
            + 2 * ratios * tiles * width + ratios * tiles * patches * width  # pre/post tile, tile positions
            + patches * width + 3 + 4 * width)  # positions, the three gates, pre/post LayerNorm
    blocks = v.num_hidden_layers + v.num_global_layers
    return GraphParameters(matmul=blocks * per_block_matmul,
                           other=blocks * per_block_other + 2 * v.num_global_layers + stem)  # + global gates


def _resampler(config: FlamingoConfig) -> GraphParameters:
    if config.tiled:  # mllama's projector: one Linear with a bias
        v = config.vision
        return GraphParameters(matmul=v.vision_output_dim * v.text_hidden_size, other=v.text_hidden_size)
    r, width = config.resampler, config.vision.width
    if not r.enabled:
        return GraphParameters()
    inner = r.heads * r.head_dim
    per_block_matmul = 4 * width * inner + 2 * width * r.mlp_width
    per_block_other = 3 * 2 * width + (4 * r.head_dim if r.qk_layer_norms else 0)
    other = r.depth * per_block_other + r.latents * width + r.max_frames * width + 2 * width
    return GraphParameters(matmul=r.depth * per_block_matmul, other=other)


def _cross_kv(config: FlamingoConfig) -> GraphParameters:
    text, blocks = config.decoder, len(config.decoder.cross_layers)
    inner = text.cross_kv_head_count * text.cross_head_dim  # the K/V heads (grouped-query: fewer)
    return GraphParameters(matmul=blocks * 2 * config.visual_width * inner,
                           other=blocks * (text.cross_head_dim if text.cross_qk_norms else 0))


def _decoder(config: FlamingoConfig) -> GraphParameters:
    t = config.decoder
    attn_matmul, attn_bias = _linear(t.width, t.width, t.attn_bias)  # q and o
    kv_matmul, kv_bias = _linear(t.kv_head_count * t.head_dim, t.width, t.attn_bias)  # k, v (grouped-query: fewer)
    mlp_matmul, mlp_bias = _mlp(t.mlp, t.width, t.mlp_width, t.mlp_bias)
    norms = 2 * _norm(t.norm, t.width, t.norm_bias) + (2 * _norm(t.norm, t.width, t.norm_bias) if t.qk_norm else 0)
    layer_matmul = 2 * attn_matmul + 2 * kv_matmul + mlp_matmul
    layer_other = 2 * attn_bias + 2 * kv_bias + mlp_bias + norms
    inner = t.cross_heads * t.cross_head_dim
    cross_mlp, cross_mlp_bias = _mlp(t.cross_mlp, t.width, t.cross_mlp_width or t.mlp_width, False)
    gates = 2 * (t.width if t.vector_gates else 1)
    cross_other = (2 * _norm(t.cross_norm, t.width) + gates + cross_mlp_bias
                   + (t.cross_head_dim if t.cross_qk_norms else 0))  # q_norm here; k_norm is xattn_kv's
    blocks = len(t.cross_layers)
    return GraphParameters(
        matmul=t.self_attention_layers * layer_matmul + blocks * (2 * t.width * inner + cross_mlp),
        lm_head=t.width * t.total_vocab_size, embedding=t.width * (t.total_vocab_size + t.input_only_vocab),
        other=t.self_attention_layers * layer_other + blocks * cross_other + _norm(t.norm, t.width, t.norm_bias))


def parameter_counts(config: FlamingoConfig) -> dict[str, GraphParameters]:
    """The parameters of each graph of the contract, counted from the config (equal to the PyTorch reference's,
    tests/cli/test_plan.py)."""
    return {"vision": _vision(config), "resampler": _resampler(config), "xattn_kv": _cross_kv(config),
            "decoder": _decoder(config)}


def _quantized_bytes(weights: int, precision: Precision, scale_bytes: int = FLOAT_BYTES) -> float:
    """Bytes of `weights` matrix weights at a weight-only precision: the integers plus one scale a block."""
    bits = 4 if precision is Precision.INT4 else 8
    return weights * (bits / 8 + scale_bytes / BLOCK_SIZE[precision])


def graph_bytes(name: str, params: GraphParameters, precision: Precision, *, lm_head: bool = True,
                float16: bool = False, embeddings: bool = False) -> dict[str, float]:
    """Bytes of one graph's weights at `precision`, split into {"matmul", "lm_head", "embedding", "other"}, as
    `flamingo-edge quantize` writes them: weight-only precisions quantize the matrix products of WEIGHT_ONLY_GRAPHS
    (the LM head unless `lm_head` is False) and leave the rest fp32; int8 quantizes INT8_GRAPHS' matrix products to
    one byte (per-channel scales are negligible); fp16 halves everything. For weight-only precisions, `float16`
    (quantize --float fp16) makes the rest and the scales fp16, and `embeddings` (quantize --embeddings) quantizes
    the token embedding too."""
    weight_only = precision in BLOCK_SIZE
    floats = 2 if precision is Precision.FP16 or (weight_only and float16) else FLOAT_BYTES
    sizes = {kind: float(count * floats) for kind, count in asdict(params).items()}
    if weight_only and name in WEIGHT_ONLY_GRAPHS:
        scale = 2 if float16 else FLOAT_BYTES
        sizes["matmul"] = _quantized_bytes(params.matmul, precision, scale)
        if lm_head:
            sizes["lm_head"] = _quantized_bytes(params.lm_head, precision, scale)
        if embeddings:
            sizes["embedding"] = _quantized_bytes(params.embedding, precision, scale)
    elif precision is Precision.INT8 and name in INT8_GRAPHS:
        sizes["matmul"] = float(params.matmul)
    return sizes


# ---------------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    """What a plan is made for: a config, and for an export its precision and its graphs' sizes on disk."""

    path: str
    kind: str  # "export", "checkpoint" or "config"
    config: FlamingoConfig
    precision: Precision | None = None  # an export's
    file_bytes: dict[str, int] = field(default_factory=dict)  # graph -> bytes of its files (an export's)


def read_source(path: str | Path) -> Source:
    """An export folder, a checkpoint folder, or a config.json (IDEFICS, Llama 3.2 Vision, or a converted
    checkpoint's).

    Raises:
        CheckpointError, ExportError: nothing readable there; the message says what to pass.
    """
    path = Path(path)
    if path.is_dir() and (path / EXPORT_RECORD).is_file():
        record = read_export_record(path, verify_hashes=False)
        sizes = {}
        for name, graph in record.graphs.items():
            files = [graph.file] + ([graph.data_file] if graph.data_file else [])
            sizes[name] = sum((path / file).stat().st_size for file in files)
        return Source(str(path), "export", FlamingoConfig.from_dict(record.config), Precision(record.precision),
                      sizes)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: neither an export (export.json) nor a checkpoint (config.json); pass "
                                  "one of those, or a config.json file")
        return Source(str(path), "checkpoint", read_config_json(path / "config.json"))
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder; pass an export, a checkpoint or a config.json")
    return Source(str(path), "config", read_config_json(path))


# ---------------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Item:
    """One line of a plan."""

    name: str
    bytes: int
    note: str = ""
    graph: str = ""  # the graph whose weights these are


@dataclass(frozen=True)
class Plan:
    """The memory one precision needs at the given limits."""

    precision: Precision
    runtime: str
    limits: ShapeLimits
    items: tuple[Item, ...]

    @property
    def total(self) -> int:
        return sum(item.bytes for item in self.items)

    def item(self, name: str) -> int:
        return sum(item.bytes for item in self.items if item.name == name)


def self_kv_bytes(config: FlamingoConfig, context: int, batch: int) -> int:
    """Self-attention K and V of every layer at `context` tokens: 2 x layers x Hkv x Dh x P x B x 4 (Hkv, the
    key/value heads, fewer than the query heads with grouped-query attention)."""
    t = config.decoder
    return 2 * t.self_attention_layers * t.kv_head_count * t.head_dim * context * batch * FLOAT_BYTES


def cross_kv_bytes(config: FlamingoConfig, images: int) -> int:
    """Cross-attention K and V of `images` images: 2 x gated blocks x Hx x Dh x L x images x 4."""
    t = config.decoder
    return (2 * len(t.cross_layers) * t.cross_kv_head_count * t.cross_head_dim * config.visual_tokens_per_image * images
            * FLOAT_BYTES)


def _image_elements(config: FlamingoConfig) -> tuple[int, int]:
    """Elements of the biggest tensors the vision and resampler graphs hold for one image.

    vision: attention scores [N, H, T, T] or the MLP's hidden [N, T, mlp]. A tiled tower (mllama) runs its local
    and global transformers over every tile's padded tokens at once, a few heads at a time (`heads_per_chunk`), so
    its scores are [N, chunk, T*P8, T*P8]; else its MLP's hidden, its output [N, T, P, Dvo] or the residual stream
    [N, T*P8, D] twice; plus the kept local layers' outputs (K of [N, T*P8, D]), held from the local transformer to
    the output.
    resampler: scores [N, H, L, T + L], its MLP or its input; mllama's projector: its input [N, T, P, Dvo] or output.
    """
    v, r = config.vision, config.resampler
    if config.tiled:
        tokens, kept = v.max_num_tiles * v.padded_patches_per_tile, len(v.kept_layers)
        features = v.max_num_tiles * v.patches_per_tile
        vision = tokens * max(v.heads_per_chunk() * tokens, v.intermediate_size, 2 * v.hidden_size)
        vision = max(vision, features * v.vision_output_dim) + kept * tokens * v.hidden_size
        return vision, features * max(v.vision_output_dim, v.text_hidden_size)
    tokens, latents = v.num_tokens, config.visual_tokens_per_image
    vision = tokens * max(v.heads * tokens, v.mlp_width, 2 * v.width)
    return vision, max(r.heads * latents * (tokens + latents), latents * r.mlp_width, tokens * v.width)


def _largest_tensors(config: FlamingoConfig, limits: ShapeLimits) -> dict[str, int]:
    """Elements of the biggest tensor each graph holds at the profiles' largest shapes, and of its residual stream.

    vision and resampler: `_image_elements` for every image of the profile (N = batch x images); xattn_kv: its
    input [N, L, D] or one block's K and V [N, Hx, L, Dh] (its outputs, every block's K and V, are the
    cross-attention K/V line, not its context's); decoder prefill: self-attention scores [B, H, S, P + S],
    cross-attention scores [B, H, S, M*L] (mllama: M*T*P, every tile's tokens), the MLP [B, S, mlp] or logits
    [B, S, V]; decoder decode: the same with S = 1.
    """
    t = config.decoder
    images = limits.max_batch * limits.max_images
    batch, prompt, context = limits.max_batch, limits.max_prompt, limits.max_context
    visual = limits.max_images * config.visual_tokens_per_image  # the visual tokens one row attends to
    vision, resampler = _image_elements(config)

    def decoder(s: int) -> int:
        return batch * s * max(t.heads * context, t.cross_heads * visual, t.mlp_width, t.total_vocab_size,
                               2 * t.width)

    return {
        "vision": images * vision,
        "resampler": images * resampler,
        "xattn_kv": images * config.visual_tokens_per_image * max(
            config.visual_width, 2 * t.cross_kv_head_count * t.cross_head_dim),
        "decoder (prefill)": decoder(prompt),
        "decoder (decode)": decoder(1),
    }


def _weights(config: FlamingoConfig, precision: Precision, source: Source | None, lm_head: bool,
             float16: bool = False, embeddings: bool = False) -> list[Item]:
    """A line per graph (the decoder's embedding and LM head apart): the export's files when the plan is for the
    export's own precision, otherwise counted from the config."""
    counts = parameter_counts(config)
    items = []
    for name in GRAPH_NAMES:
        sizes = graph_bytes(name, counts[name], precision, lm_head=lm_head, float16=float16, embeddings=embeddings)
        if source is not None and source.precision is precision and name in source.file_bytes:
            scale = source.file_bytes[name] / max(sum(sizes.values()), 1)  # what is on disk, split as counted
            sizes = {kind: size * scale for kind, size in sizes.items()}
        if name == "decoder":
            kind = "quantized" if embeddings and precision in BLOCK_SIZE else "float"
            items.append(Item("decoder: embedding", int(sizes.pop("embedding")), f"token embedding ({kind})", name))
            items.append(Item("decoder: LM head", int(sizes.pop("lm_head")), "output projection", name))
        items.append(Item(f"weights: {name}" if name != "decoder" else "decoder: layers", int(sum(sizes.values())),
                          f"{counts[name].total / 1e6:.1f} M parameters", name))
    return items


def cached_images(config: FlamingoConfig, image_cache: int) -> int:
    """Images the pipeline's image cache keeps: `image_cache` asked, within its byte bound (IMAGE_CACHE_BYTES)."""
    return min(image_cache, IMAGE_CACHE_BYTES // cross_kv_bytes(config, 1))


def _prefix_cache_item(prefix_cache_bytes: int) -> Item:
    return Item("prefix cache", prefix_cache_bytes, "self-attention K/V of earlier prompts, kept for reuse, when full")


def _tensorrt_items(config: FlamingoConfig, limits: ShapeLimits, workspace_mib: int | None,
                    image_cache: int = IMAGE_CACHE, prefix_cache_bytes: int = PREFIX_CACHE_BYTES) -> list[Item]:
    """Caches, activations and runtime of TensorRT engines (a reasoned estimate; docs/plan.md)."""
    largest = _largest_tensors(config, limits)
    batch, images = limits.max_batch, limits.max_batch * limits.max_images
    self_kv = self_kv_bytes(config, limits.max_context, batch)
    new_kv = self_kv_bytes(config, limits.max_prompt, batch)
    cross = cross_kv_bytes(config, images)
    cached = cached_images(config, image_cache)
    # A context holds its input, its output and one tensor of the largest size at once; TensorRT reuses the rest.
    activations = sum(3 * elements * FLOAT_BYTES for elements in largest.values())
    scratch = max(largest.values()) * FLOAT_BYTES  # tactic scratch of the biggest GEMM/attention, within the cap
    if workspace_mib:
        scratch = min(scratch, workspace_mib * MIB)
    return [
        Item("self-attention K/V", 2 * self_kv + TRT_STAGING_COPIES * new_kv,
             f"the cache at P={limits.max_context}, B={batch} on the host and its mirror on the device; new K/V for "
             f"{limits.max_prompt} tokens (device + pinned host)"),
        Item("cross-attention K/V", TRT_STAGING_COPIES * 2 * cross + cross_kv_bytes(config, cached),
             f"M={limits.max_images} images x B={batch} (xattn_kv out, decoder in) + {cached} cached images"),
        Item("activations", activations, "5 execution contexts at the profiles' largest shapes"),
        Item("workspace", scratch, "tactic scratch of the largest layer" + (f" (cap {workspace_mib} MiB)"
                                                                             if workspace_mib else "")),
        _prefix_cache_item(prefix_cache_bytes),
        Item("runtime", TRT_RUNTIME_BYTES, "Python, numpy, tokenizers, OpenCV, TensorRT runtime"),
    ]


def _ort_weight_rss(items: list[Item], precision: Precision, lm_head: bool) -> int:
    """ONNX Runtime CPU's resident bytes for the weights (ORT_RSS_PER_BYTE by how its kernels hold them)."""
    def kind(item: Item) -> str:
        if item.name == "decoder: embedding" or (item.name == "decoder: LM head" and not lm_head):
            return "other" if precision is not Precision.FP16 else "float16"
        if precision in BLOCK_SIZE and item.graph in WEIGHT_ONLY_GRAPHS:
            return "nbits"
        return "float16" if precision is Precision.FP16 else "float32"

    return int(sum(item.bytes * ORT_RSS_PER_BYTE[kind(item)] for item in items))


def _onnxruntime_items(config: FlamingoConfig, limits: ShapeLimits, weights: list[Item],
                       precision: Precision, lm_head: bool, image_cache: int = IMAGE_CACHE,
                       prefix_cache_bytes: int = PREFIX_CACHE_BYTES) -> list[Item]:
    """The rest of a process's peak RSS on ONNX Runtime's CPU provider (measured constants; docs/plan.md)."""
    largest = _largest_tensors(config, limits)
    batch, images = limits.max_batch, limits.max_batch * limits.max_images
    resident = _ort_weight_rss(weights, precision, lm_head) - sum(item.bytes for item in weights)
    cached = cached_images(config, image_cache)
    # The decoder reads the cache's buffer in place and returns only the new tokens' K/V (graph contract v2); the
    # cross K/V of a run's images are the decoder's feed, and the image cache keeps `cached` images' apart.
    caches = (self_kv_bytes(config, limits.max_context, batch) + self_kv_bytes(config, limits.max_prompt, batch)
              + cross_kv_bytes(config, images) + cross_kv_bytes(config, cached))
    activations = ORT_ARENA_SLACK * 3 * max(largest.values()) * FLOAT_BYTES
    return [
        Item("weights: kernel copies", resident, "MLAS pre-packing, MatMulNBits blocks, fp16 folded to fp32"),
        Item("K/V caches", caches, f"self at P={limits.max_context}, cross for {images} images + {cached} cached"),
        Item("activations", activations, "largest intermediates, arena growth"),
        _prefix_cache_item(prefix_cache_bytes),
        Item("runtime", ORT_PROCESS_BYTES + ORT_OPENCV_BYTES + ORT_SESSION_BYTES,
             "Python + numpy + onnxruntime + tokenizers + OpenCV, the first session's setup"),
    ]


def plan_for(source: Source, precision: str | Precision, limits: ShapeLimits, *, runtime: str = "tensorrt",
             workspace_mib: int | None = None, lm_head: bool = True, float16: bool = False,
             embeddings: bool = False, image_cache: int = IMAGE_CACHE,
             prefix_cache_bytes: int = PREFIX_CACHE_BYTES) -> Plan:
    """The memory `source` needs at `precision` and `limits`.

    Args:
        source: from `read_source`.
        precision: one of EXPORT_PRECISIONS.
        limits: batch, prompt, context and images (engines/profiles.py); context within the model's positions.
        runtime: "tensorrt" (engines on a Jetson or GPU) or "onnxruntime-cpu" (a process's peak RSS).
        workspace_mib: the TensorRT builder's workspace cap, if any.
        lm_head: weight-only precisions quantize the LM head too (quantize's default).
        float16, embeddings: weight-only precisions with quantize's --float fp16 and --embeddings.
        image_cache: images whose cross K/V the pipeline keeps (Pipeline.open's image_cache_size).
        prefix_cache_bytes: the pipeline's prefix cache (Pipeline.open's prefix_cache_bytes), counted full.

    Raises:
        UsageError: an unknown precision or runtime, a negative image or prefix cache, or limits that make no
            engine.
    """
    if precision not in [p.value for p in EXPORT_PRECISIONS]:
        raise UsageError(f"precision {precision!r}; choose one of {', '.join(p.value for p in EXPORT_PRECISIONS)}")
    if runtime not in RUNTIMES:
        raise UsageError(f"runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if image_cache < 0:
        raise UsageError(f"image cache {image_cache}: give the number of images the pipeline keeps (>= 0)")
    if prefix_cache_bytes < 0:
        raise UsageError(f"prefix cache {prefix_cache_bytes} bytes: give the bytes the pipeline keeps (>= 0)")
    precision, config = Precision(precision), source.config
    limits.check(config.decoder.max_positions)
    weights = _weights(config, precision, source, lm_head, float16, embeddings)
    rest = (_tensorrt_items(config, limits, workspace_mib, image_cache, prefix_cache_bytes) if runtime == "tensorrt"
            else _onnxruntime_items(config, limits, weights, precision, lm_head, image_cache, prefix_cache_bytes))
    return Plan(precision, runtime, limits, tuple(weights + rest))


# ---------------------------------------------------------------------------------------------------- fitting


def budget_bytes(target: str) -> int:
    """Bytes one process may use on a target: a DEVICES name, or a number of GiB (a GPU, or a host's memory).

    Raises:
        UsageError: neither.
    """
    if target in DEVICES:
        return int(DEVICES[target].usable_gib * GIB)
    try:
        gib = float(target)
    except ValueError:
        gib = 0.0
    if not gib > 0:
        raise UsageError(f"target {target!r}: give one of {', '.join(DEVICES)} or a memory size in GiB (e.g. 24)")
    return int(gib * GIB)


def largest_fit(plan_at, low: int, high: int, budget: int) -> int:
    """The largest n in [low, high] with plan_at(n).total <= budget (totals grow with n), or 0 if none."""
    if plan_at(low).total > budget:
        return 0
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if plan_at(middle).total <= budget else (low, middle - 1)
    return low


@dataclass(frozen=True)
class Fit:
    """Where one precision stands against a budget."""

    plan: Plan
    fits: bool
    max_context: int  # the longest context that fits with the asked images (0: none)
    max_images: int  # the most images that fit with the asked context (0: none)


def fit(source: Source, precision: Precision, limits: ShapeLimits, budget: int, **options) -> Fit:
    """`plan_for` at `limits`, and the largest context and image count within `budget`."""
    plan = plan_for(source, precision, limits, **options)
    positions = source.config.decoder.max_positions

    def at_context(context: int) -> Plan:
        return plan_for(source, precision, replace(limits, max_context=context,
                                                   max_prompt=min(limits.max_prompt, context)), **options)

    def at_images(images: int) -> Plan:
        return plan_for(source, precision, replace(limits, max_images=images), **options)

    return Fit(plan, plan.total <= budget, largest_fit(at_context, 1, positions, budget),
               largest_fit(at_images, 1, 4096, budget))


def recommend(fits: list[Fit]) -> Precision | None:
    """The most accurate precision (PRECISION_ORDER) that fits, or None."""
    fitting = {f.plan.precision for f in fits if f.fits}
    return next((p for p in PRECISION_ORDER if p in fitting), None)


def plan_report(source: str | Path, *, target: str | None = None, precision: list[str] | None = None,
                runtime: str = "tensorrt", max_context: int | None = None, max_images: int | None = None,
                max_batch: int | None = None, max_prompt: int | None = None, workspace_mib: int | None = None,
                float16: bool = False, embeddings: bool = False, tensorrt_version: str | None = None,
                image_cache: int = IMAGE_CACHE, prefix_cache_bytes: int = PREFIX_CACHE_BYTES) -> dict:
    """The plan of `source` at every asked precision, and for each target what fits (JSON-ready).

    Args:
        source: an export folder, a checkpoint folder or a config.json.
        target: a DEVICES name or a size in GiB (default: every Jetson in DEVICES).
        precision: precisions to plan (default: all of EXPORT_PRECISIONS, most accurate first).
        runtime: "tensorrt" or "onnxruntime-cpu".
        max_context, max_images, max_batch, max_prompt: the limits (defaults: the model's positions, 1 image,
            batch 1, 512-token prompts, within the context).
        workspace_mib: the TensorRT builder's workspace cap.
        float16, embeddings: weight-only precisions as quantize's --float fp16 and --embeddings make them.
        tensorrt_version: the TensorRT that will build; 8.x (JetPack 5) has no weight-only precision, so int4 and
            int8-weights are left out of the plan and the recommendation.
        image_cache: images whose cross K/V the pipeline keeps (Pipeline.open's image_cache_size, default 64).
        prefix_cache_bytes: the pipeline's prefix cache (Pipeline.open's prefix_cache_bytes, default 64 MiB).

    Raises:
        CheckpointError, ExportError: `source` cannot be read. UsageError: a bad target, precision or limit.
    """
    read = read_source(source)
    context = min(max_context or read.config.decoder.max_positions, read.config.decoder.max_positions)
    limits = ShapeLimits(max_batch=max_batch or 1, max_prompt=min(max_prompt or 512, context), max_context=context,
                         max_images=max_images or 1)
    precisions = [Precision(p) for p in (precision or [p.value for p in PRECISION_ORDER])]
    notes = []
    if tensorrt_version is not None:
        from flamingo_edge.trt_compat import has_weight_only

        if not has_weight_only(tensorrt_version) and any(p in BLOCK_SIZE for p in precisions):
            precisions = [p for p in precisions if p not in BLOCK_SIZE]
            notes.append(f"TensorRT {tensorrt_version} (JetPack 5) has no INT4 and no weight-only quantization: "
                         "int4 and int8-weights are left out; int8 (Q/DQ) is its smallest precision")
        if not precisions:
            raise UsageError(f"TensorRT {tensorrt_version} cannot build any of the asked precisions")
    options = dict(runtime=runtime, workspace_mib=workspace_mib, float16=float16, embeddings=embeddings,
                   image_cache=image_cache, prefix_cache_bytes=prefix_cache_bytes)
    plans = [plan_for(read, p, limits, **options) for p in precisions]
    targets = []
    for name in [target] if target else list(DEVICES):
        budget = budget_bytes(name)
        fits = [fit(read, p, limits, budget, **options) for p in precisions]
        targets.append({"target": name, "budget": budget, "recommended": (r := recommend(fits)) and r.value,
                        "precisions": [{"precision": f.plan.precision.value, "fits": f.fits,
                                        "max_context": f.max_context, "max_images": f.max_images} for f in fits]})
    return {"source": read.path, "kind": read.kind,
            "export_precision": read.precision.value if read.precision else None, "runtime": runtime,
            "weight_only": {"float": "fp16" if float16 else "fp32", "embeddings": embeddings}, "notes": notes,
            "image_cache": image_cache, "image_cache_kept": cached_images(read.config, image_cache),
            "prefix_cache_bytes": prefix_cache_bytes,
            "limits": asdict(limits),
            "plans": [{"precision": p.precision.value, "total": p.total, "items": [asdict(i) for i in p.items]}
                      for p in plans],
            "targets": targets}


def check_build_fits(export_dir: str | Path, target_name: str, limits: ShapeLimits,
                     workspace_mib: int | None, image_cache: int = IMAGE_CACHE,
                     prefix_cache_bytes: int = PREFIX_CACHE_BYTES) -> None:
    """Refuse a build whose engines the target board cannot hold at `limits` (BUILD_TARGET_DEVICES; other targets
    are not checked). AGX Orin is checked against 64 GB, with a warning when 32 GB would not do. `image_cache`: the
    images whose cross K/V the pipeline will keep (Pipeline.open's image_cache_size); `prefix_cache_bytes`: its
    prefix cache (Pipeline.open's prefix_cache_bytes).

    Raises:
        MemoryPlanError: the plan's total exceeds the board's memory; the message gives the figures and the ways
            out (a smaller precision or limits, `--force`).
    """
    from flamingo_edge.errors import MemoryPlanError

    boards = BUILD_TARGET_DEVICES.get(target_name)
    if not boards:
        return
    source = read_source(export_dir)
    options = dict(workspace_mib=workspace_mib, image_cache=image_cache, prefix_cache_bytes=prefix_cache_bytes)
    plan = plan_for(source, source.precision, limits, **options)
    largest, *smaller = boards
    for board in smaller:
        if plan.total > budget_bytes(board):
            logger.warning(
                "the engines need %.1f GiB (flamingo-edge plan): more than %s has for a process (%.1f GiB)",
                plan.total / GIB, DEVICES[board].note, DEVICES[board].usable_gib)
    budget = budget_bytes(largest)
    if plan.total <= budget:
        return
    weights = sum(item.bytes for item in plan.items if item.graph)
    fits = [fit(source, p, limits, budget, **options) for p in PRECISION_ORDER]
    better = recommend(fits)
    advice = (f"quantize the export to {better.value} (flamingo-edge quantize --precision {better.value})"
              if better else "lower --max-context/--max-images/--max-batch")
    raise MemoryPlanError(
        f"{DEVICES[largest].note} cannot hold these {source.precision.value} engines: the plan needs "
        f"{plan.total / GIB:.1f} GiB (weights {weights / GIB:.1f}, self-attention K/V "
        f"{plan.item('self-attention K/V') / GIB:.1f} at context {limits.max_context}, the rest "
        f"{(plan.total - weights - plan.item('self-attention K/V')) / GIB:.1f}) and a process gets "
        f"{budget / GIB:.1f} GiB there; {advice}, see flamingo-edge plan {export_dir} --target {largest}, or "
        "build anyway with --force")

"""Where an ONNX Runtime int4 decode step goes on this CPU: the step against its weight kernels alone, each at 1 and 2
threads, and what each kind of fused node costs, all in one process with interleaved rounds (issue 15, point "int4
decode reaches 50 % of its bandwidth floor").

    python benchmarks/int4_step.py EXPORT [--past 63] [--rounds 24] [--steps 20] [--without OP[,OP...] ...]

EXPORT is an int4 or int8-weights export for ONNX Runtime (`flamingo-edge quantize --precision int4`), whose decoder
writes the cache in place (the default fusions). The commands behind the figures in benchmarks/README.md:

    python samples/random_idefics.py out/idefics-100m --preset 100m
    flamingo-edge export out/idefics-100m -o out/100m-onnx
    flamingo-edge quantize out/100m-onnx --precision int4 -o out/100m-int4
    python benchmarks/int4_step.py out/100m-int4 --without GroupQueryAttention --without MultiHeadAttention \\
        --without RotaryEmbedding --without SimplifiedLayerNormalization

The sessions, each with the pipeline's session settings:
- `step`: one decode step of the decoder (S = 1) over a cache of --past slots and one image, its cache buffers bound
  as past and present as the pipeline binds them;
- `step, 1 thread`: the same with intra_op_num_threads=1;
- `weights`: the decoder's MatMulNBits alone, same weights and attributes, each reading a graph input of its width
  (what the weight kernels cost without the rest of the graph), at 2 and 1 threads;
- `step without OP`: the ONNX Runtime-optimized decoder with every OP node replaced by Identity (wrong numbers, same
  shapes; an attention node's present outputs pass its past through): the step minus the cost of OP, unprofiled;
- `step (control)`: a second copy of `step`, for the spread between two identical sessions.

Before each round it measures the copy bandwidth (read + write, as `bench` does) and the read bandwidth (a sum over
a 256 MiB buffer) with 2 threads. It prints the median of the rounds, the weights' rate in GB/s and, for `step`, the
fraction of the bytes the weights read over the copy bandwidth ("weights' floor"), as `bench` judges decode.

Exit status: 0 done; 2 a bad argument or an export without an in-place MatMulNBits decoder.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def session(path: Path, threads: int):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.add_session_config_entry("session.force_spinning_stop", "1")  # as the pipeline's sessions
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def decode_binding(sess, config, past: int, rng: np.random.Generator):
    """An IO binding of one decode step at `past` cache slots and one image, the cache bound in place."""
    from flamingo_edge.graphs import SEQLENS_K, TOTAL_LENGTH

    feed = {}
    for tensor in sess.get_inputs():
        name, dims = tensor.name, tensor.shape
        if name == "input_ids":
            feed[name] = np.array([[min(17, config.decoder.vocab_size - 1)]], np.int64)
        elif name == "attention_mask":
            feed[name] = np.ones((1, past + 1), np.int64)
        elif name.startswith(("past_key.", "past_value.")):
            feed[name] = rng.standard_normal((1, dims[1], past, dims[3])).astype(np.float32)
        elif name.startswith(("cross_key.", "cross_value.")):
            feed[name] = rng.standard_normal((1, dims[1], config.visual_tokens_per_image, dims[3])).astype(np.float32)
        elif name == "image_attention_mask":
            feed[name] = np.ones((1, 1, config.slots_per_image), np.int64 if "int64" in tensor.type else np.float32)
        elif name == SEQLENS_K:
            feed[name] = np.array([past - 1], np.int32)  # the new token goes to the last slot
        elif name == TOTAL_LENGTH:
            feed[name] = np.array(past, np.int32)
        else:
            raise SystemExit(f"int4_step: the decoder has an input this script does not know: {name}")
    binding = sess.io_binding()
    for name, array in feed.items():
        binding.bind_cpu_input(name, array)
    for out in sess.get_outputs():
        if out.name.startswith("present_"):
            buffer = feed[out.name.replace("present_", "past_")]
            binding.bind_output(out.name, "cpu", 0, np.float32, list(buffer.shape), buffer.ctypes.data)
        else:
            binding.bind_output(out.name, "cpu")
    return binding, feed  # the feed's arrays stay referenced with the binding


def weights_only(decoder):
    """The decoder's MatMulNBits alone (same weights and attributes), each reading an input `x{K}` [1, 1, K]."""
    from onnx import TensorProto, helper

    nodes, widths, used = [], set(), set()
    for node in decoder.graph.node:
        if node.op_type == "MatMulNBits":
            width = next(a.i for a in node.attribute if a.name == "K")
            copy = helper.make_node("MatMulNBits", [f"x{width}", *node.input[1:]], [node.output[0]], name=node.name,
                                    domain=node.domain)
            copy.attribute.extend(node.attribute)
            nodes.append(copy)
            widths.add(width)
            used.update(node.input[1:])
    inputs = [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [1, 1, k]) for k in sorted(widths)]
    outputs = [helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, None) for n in nodes]
    graph = helper.make_graph(nodes, "weights", inputs, outputs,
                              [i for i in decoder.graph.initializer if i.name in used])
    model = helper.make_model(graph, opset_imports=list(decoder.opset_import))
    model.ir_version = decoder.ir_version
    return model, sum(len(i.raw_data) for i in graph.initializer)  # onnx.load read any external data in


def without(optimized, op_types: set[str]):
    """The optimized decoder with every node of `op_types` replaced by Identity of its first input (an attention
    node's present outputs: Identity of its past)."""
    from onnx import ModelProto, helper

    model = ModelProto()
    model.CopyFrom(optimized)
    extra = []
    for node in model.graph.node:
        if node.op_type not in op_types:
            continue
        first, outputs = node.input[0], list(node.output)
        if node.op_type == "GroupQueryAttention":  # outputs: attention, present key, present value
            extra += [helper.make_node("Identity", [node.input[3]], [outputs[1]]),
                      helper.make_node("Identity", [node.input[4]], [outputs[2]])]
        node.ClearField("attribute")
        node.domain, node.op_type = "", "Identity"
        del node.input[:], node.output[:]
        node.input.append(first)
        node.output.append(outputs[0])
    model.graph.node.extend(extra)
    return model


def bandwidths(source: np.ndarray, target: np.ndarray, pool) -> tuple[float, float]:
    """(copy, read) bytes/s with the pool's 2 threads, best of 3: copy counts read + write, as `bench` does."""
    middle = source.size // 2
    bounds = [(0, middle), (middle, source.size)]
    words = source.view(np.int32)

    def best(work) -> float:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            list(pool.map(work, bounds))
            times.append(time.perf_counter() - start)
        return min(times)

    copy = best(lambda b: np.copyto(target[b[0]:b[1]], source[b[0]:b[1]]))
    read = best(lambda b: np.bitwise_or.reduce(words[b[0]:b[1]]))
    return 2 * source.nbytes / copy, source.nbytes / read


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("--past", type=int, default=63, help="cache slots of the decode step (bench's 32+32 tokens)")
    parser.add_argument("--rounds", type=int, default=24)
    parser.add_argument("--steps", type=int, default=20, help="runs per session and round")
    parser.add_argument("--without", action="append", default=[], metavar="OP[,OP...]",
                        help="also time the step with these node types replaced by Identity (repeatable)")
    args = parser.parse_args(argv)

    import onnx

    from flamingo_edge.artifacts import read_export_record
    from flamingo_edge.config import FlamingoConfig
    from flamingo_edge.errors import FlamingoEdgeError

    try:
        record = read_export_record(args.export)
    except FlamingoEdgeError as error:
        print(f"int4_step: {error}", file=sys.stderr)
        return 2
    config = FlamingoConfig.from_dict(record.config)
    decoder_path = args.export / "decoder.onnx"
    decoder = onnx.load(str(decoder_path))
    if not any(n.op_type == "MatMulNBits" for n in decoder.graph.node) or \
            "seqlens_k" not in {i.name for i in decoder.graph.input}:
        print(f"int4_step: {decoder_path} is not an in-place MatMulNBits decoder; quantize with --precision int4 "
              "(ONNX Runtime target, default fusions)", file=sys.stderr)
        return 2

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        weights, weight_bytes = weights_only(decoder)
        onnx.save(weights, str(work / "weights.onnx"))
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        options.optimized_model_filepath = str(work / "optimized.onnx")
        onnxruntime.InferenceSession(str(decoder_path), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(str(work / "optimized.onnx"))
        variants = {}
        for ops in args.without:
            path = work / f"without-{ops.replace(',', '-')}.onnx"
            onnx.save(without(optimized, set(ops.split(","))), str(path))
            variants[f"step without {ops}"] = path

        runs = {}
        for name, path, threads in (("step", decoder_path, 2), ("step (control)", decoder_path, 2),
                                    ("step, 1 thread", decoder_path, 1),
                                    *((name, path, 2) for name, path in variants.items())):
            sess = session(path, threads)
            runs[name] = (sess, *decode_binding(sess, config, args.past, rng))
        for name, threads in (("weights", 2), ("weights, 1 thread", 1)):
            sess = session(work / "weights.onnx", threads)
            binding = sess.io_binding()
            feed = {i.name: rng.standard_normal(i.shape).astype(np.float32) for i in sess.get_inputs()}
            for key, value in feed.items():
                binding.bind_cpu_input(key, value)
            for out in sess.get_outputs():
                binding.bind_output(out.name, "cpu")
            runs[name] = (sess, binding, feed)

        source = np.ones(64 << 20, np.float32)  # 256 MiB, beyond any cache
        target = np.ones_like(source)
        times = {name: [] for name in runs}
        copies, reads = [], []
        with ThreadPoolExecutor(2) as pool:
            for sess, binding, _ in runs.values():
                for _ in range(5):
                    sess.run_with_iobinding(binding)
            for round_ in range(args.rounds):
                copy, read = bandwidths(source, target, pool)
                copies.append(copy)
                reads.append(read)
                names = list(runs)
                for name in names[round_ % len(names):] + names[:round_ % len(names)]:  # rotate who goes first
                    sess, binding, _ = runs[name]
                    start = time.perf_counter()
                    for _ in range(args.steps):
                        sess.run_with_iobinding(binding)
                    times[name].append((time.perf_counter() - start) / args.steps)

    copy, read = statistics.median(copies), statistics.median(reads)
    print(f"{args.export}: {sum(n.op_type == 'MatMulNBits' for n in decoder.graph.node)} MatMulNBits reading "
          f"{weight_bytes / 2**20:.2f} MiB a step; decode step at {args.past} cache slots, 1 image; "
          f"median of {args.rounds} rounds of {args.steps} runs")
    print(f"bandwidth, 2 threads: copy {copy / 1e9:.1f} GB/s (read + write), read {read / 1e9:.1f} GB/s")
    step = statistics.median(times["step"])
    for name, values in times.items():
        median = statistics.median(values)
        line = f"  {name:44s} {median * 1e3:7.3f} ms"
        if name.startswith("weights"):
            line += f"  {weight_bytes / median / 1e9:5.1f} GB/s of weights"
        elif name.startswith("step without"):
            line += f"  the removed nodes: {(step - median) * 1e3:6.3f} ms"
        print(line)
    floor = weight_bytes / copy
    weights = statistics.median(times["weights"])
    print(f"weights' floor {floor * 1e3:.3f} ms: the weights alone reach {floor / weights:.0%} of it, the step "
          f"{floor / step:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

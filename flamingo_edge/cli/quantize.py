"""`flamingo-edge quantize EXPORT --precision fp16|int8|int4|int8-weights -o OUT`: FP16, INT8 (Q/DQ) or weight-only
4/8-bit graphs as a complete export."""

from __future__ import annotations

import argparse

HELP = ("write an fp16, int8 (explicit Q/DQ, calibrated) or weight-only int4/int8-weights copy of an fp32 export "
        "that generate, eval, compare and bench accept unchanged")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from flamingo_edge.calibration.quantize import METHODS, PRECISIONS, WEIGHT_METHODS, WEIGHT_TARGETS
    from flamingo_edge.calibration.weights import BLOCK_SIZES
    from flamingo_edge.graphs import GRAPH_NAMES

    parser.add_argument("export_dir", metavar="EXPORT",
                        help="the fp32 export folder (`demo`: the bundled checkpoint's cached export)")
    parser.add_argument("--precision", required=True, choices=PRECISIONS)
    parser.add_argument("--calibration", metavar="CALIB",
                        help="int8 and gptq: a flamingo-edge calibrate folder recorded on this export")
    parser.add_argument("--method", choices=METHODS + WEIGHT_METHODS,
                        help="int8: activation ranges (default: minmax); int4/int8-weights: rtn (default, no data) "
                             "or gptq (needs --calibration)")
    parser.add_argument("--graphs", nargs="+", choices=GRAPH_NAMES, metavar="GRAPH",
                        help="graphs to convert (default: all for fp16; vision resampler xattn_kv for int8; "
                             "xattn_kv decoder for int4/int8-weights)")
    weights = parser.add_argument_group("int4 / int8-weights (weight-only)")
    weights.add_argument("--block-size", type=int, choices=BLOCK_SIZES,
                         help="weights per scale along the input dimension; 32 errs less, 128 reads fewer bytes (default: 128 for "
                              "int8-weights)")
    weights.add_argument("--target", choices=WEIGHT_TARGETS, default="onnxruntime",
                         help="the encoding: onnxruntime (MatMulNBits, CPU and CUDA providers) or tensorrt "
                              "(block-quantized DequantizeLinear, opset 21, TensorRT 10+); default: onnxruntime")
    weights.add_argument("--accuracy-level", type=int, choices=(0, 1, 2, 3, 4), default=4,
                         help="onnxruntime: MatMulNBits' compute type; 4 = int8 activations (VNNI dot products on "
                              "x86), 0 = float32 (default: 4)")
    weights.add_argument("--keep-lm-head", action="store_true", help="leave the LM head in float")
    weights.add_argument("--float", choices=("fp32", "fp16"), default="fp32",
                         help="what is not quantized (activations, vision, resampler, embeddings) in fp32 or fp16 "
                              "(norms and softmax stay fp32); fp16 is the form TensorRT's weight-only kernels run on a "
                              "GPU and halves the vision tower; on ONNX Runtime CPU fp16 is slower (default: fp32)")
    weights.add_argument("--vision-int8", action="store_true",
                         help="onnxruntime: the vision and resampler graphs with int8 weights and dynamic int8 "
                              "activations too (VNNI on x86; about 2.4x faster vision on the 100m preset)")
    weights.add_argument("--no-fusions", action="store_true",
                         help="onnxruntime: keep the exported rotary and attention nodes instead of ONNX Runtime's "
                              "RotaryEmbedding, GroupQueryAttention writing the KV cache in place, and "
                              "MultiHeadAttention over the images (docs/weights.md)")
    weights.add_argument("--embeddings", action="store_true",
                         help="quantize the token embedding tables too (saves memory; a step reads one row per token, "
                              "so decode speed does not change)")
    parser.add_argument("--exclude-ops", nargs="+", default=[], metavar="OP",
                        help="ONNX op types to keep in float besides the defaults (docs/calibration.md)")
    parser.add_argument("--trt-version", default="10.3",
                        help="int8: the TensorRT (8.5-10.x) whose implicit INT8 reads the calibration caches written "
                             "next to the graphs; the cache header must match it. int4 --target tensorrt: the TensorRT "
                             "that will build (10.0-10.15 get TensorRT's TRT_INT4DequantizeLinear, later ones opset-21 "
                             "DequantizeLinear; 8.x has no INT4). Default: 10.3, JetPack 6")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="folder to write (must not exist)")


def main(args: argparse.Namespace) -> int:
    from flamingo_edge.artifacts import check_new_folder
    from flamingo_edge.calibration.quantize import quantize_export
    from flamingo_edge.cli.progress import Progress
    from flamingo_edge.demo.bundle import resolve_export

    check_new_folder(args.output)  # before `demo` is exported
    export_dir = resolve_export(args.export_dir)
    with Progress(desc=f"quantize ({args.precision})", unit="graph", leave=False) as bar:
        out = quantize_export(export_dir, args.output, args.precision, calibration=args.calibration,
                              method=args.method, graphs=args.graphs, exclude_ops=args.exclude_ops,
                              on_graph=lambda name: (bar.set_postfix_str(name), bar.update(1)),
                              on_step=bar.set_postfix_str,
                              tensorrt_version=args.trt_version, block_size=args.block_size, target=args.target,
                              accuracy_level=args.accuracy_level, lm_head=not args.keep_lm_head,
                              embeddings=args.embeddings, float16=args.float == "fp16",
                              vision_int8=args.vision_int8, fusions=not args.no_fusions)
    print(f"wrote {out} ({args.precision})")
    return 0

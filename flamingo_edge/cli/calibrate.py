"""`flamingo-edge calibrate EXPORT --images DIR_OR_VIDEO|demo -o CALIB`: record what each graph sees on real data."""

from __future__ import annotations

import argparse

HELP = ("run an export's fp32 pipeline on real images (a folder, a video, or `demo`) and prompts, and save the "
        "inputs each graph sees, for INT8 calibration")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from flamingo_edge.cli.arguments import count, natural

    parser.add_argument("export_dir", metavar="EXPORT", help="the fp32 export folder (`demo`: the bundled one's)")
    parser.add_argument("--images", required=True, metavar="DIR_OR_VIDEO",
                        help="a folder of images, a video file, or `demo` for generated shape scenes")
    parser.add_argument("--prompts", metavar="FILE",
                        help="prompt templates, one per line with one <image>, used in turn (default: a caption and "
                             "a question prompt)")
    parser.add_argument("--n", type=count, default=64, help="images to use (default: 64)")
    parser.add_argument("--seed", type=natural, default=7,
                        help="seed of the `demo` scenes (default: 7; training used 0, evaluation 1234)")
    parser.add_argument("--max-new-tokens", type=count, default=8,
                        help="greedy tokens per prompt, so decode steps are recorded too (default: 8)")
    parser.add_argument("-o", "--output", required=True, metavar="CALIB", help="folder to write (must not exist)")


def main(args: argparse.Namespace) -> int:

    from flamingo_edge.artifacts import check_new_folder, read_export_record
    from flamingo_edge.calibration.record import calibration_prompts, record_calibration
    from flamingo_edge.calibration.sources import load_images
    from flamingo_edge.cli.progress import Progress
    from flamingo_edge.demo.bundle import resolve_export

    check_new_folder(args.output)  # before any work
    export_dir = resolve_export(args.export_dir)
    read_export_record(export_dir)
    prompts = calibration_prompts(args.prompts)
    images = load_images(args.images, args.n, args.seed)
    with Progress(total=len(images), desc="calibrate", unit="image") as bar:
        record = record_calibration(export_dir, images, prompts, args.output, source=str(args.images),
                                    seed=args.seed, max_new_tokens=args.max_new_tokens, on_image=bar.update)
    samples = ", ".join(f"{name} {entry['samples']}" for name, entry in record.graphs.items())
    print(f"wrote {args.output}: {record.n_images} images; samples per graph: {samples}")
    return 0

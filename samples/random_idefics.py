"""Write a small IDEFICS checkpoint with random weights (offline), to try flamingo-edge without downloading a model.

    python samples/random_idefics.py out/idefics-tiny [--preset a|b|c|100m] [--seed N]
    flamingo-edge info out/idefics-tiny
"""

import argparse

from flamingo_edge.models.random_idefics import LARGER_PRESETS, PRESETS, save_random_idefics

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("out_dir", help="folder to write (created if needed)")
parser.add_argument("--preset", choices=[*sorted(PRESETS), *LARGER_PRESETS], default="a",
                    help="architecture preset: a, b, c are tiny; 100m has about 119M parameters (default: a)")
parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
args = parser.parse_args()
print(save_random_idefics(args.out_dir, preset=args.preset, seed=args.seed))

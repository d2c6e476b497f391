"""Runtime: what runs on the edge device. Imports neither torch nor transformers.

`processor` (prompts and images → model inputs), `tokenizer`, `image` (preprocessing, `load_image`). Import the
module you need, e.g. `from flamingo_edge.runtime.processor import Processor`.
"""

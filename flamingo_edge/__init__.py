"""flamingo-edge: Flamingo-style vision-language models from a PyTorch checkpoint to edge inference.

Importing the package imports neither torch nor TensorRT; each subpackage imports what it needs.
"""

__version__ = "0.1.0"

"""Upstream tensors -> our state dict, the way the importers (models/importers/) and the mllama vision loader check
it: each of our parameters from its upstream tensor (or tensors, concatenated), every shape checked against the
model we load into, and every upstream tensor used or known to be unused. The first problem is a CheckpointError
naming the file, the tensor and the fix.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from flamingo_edge.config_reader import fail


def same_shape(tensor: torch.Tensor, shape: torch.Size) -> bool:
    return tuple(tensor.shape) == tuple(shape)


def map_tensors(tensors: Mapping[str, torch.Tensor], files: Mapping[str, str], expected: Mapping[str, torch.Size],
                upstream: Callable[[str], Sequence[str]], *, tied: Mapping[str, str] | None = None,
                unused: Callable[[str], bool] = lambda name: False,
                fits: Callable[[torch.Tensor, torch.Size], bool] = same_shape) -> tuple[dict[str, torch.Tensor],
                                                                                        list[str]]:
    """Our state dict from upstream tensors.

    Args:
        tensors: upstream name -> tensor, as stored.
        files: upstream name -> the file it was read from (for messages; the folder for a tensor without one).
        expected: our parameter name -> shape, from the model we will load into.
        upstream: our name -> the upstream names that make it (several: concatenated on dim 0).
        tied: an upstream name -> the one that stands for it when it is absent (a head tied to the embedding).
        unused: whether an upstream tensor left over is one the model never reads (skipped), not an unexpected one.
        fits: whether a tensor fits our shape (then reshaped to it); equal shapes by default.

    Returns:
        (our state dict in float32, the upstream tensors skipped as unused).

    Raises:
        CheckpointError: a tensor missing, of the wrong shape, or unexpected.
    """
    folder = str(Path(next(iter(files.values()))).parent) if files else "checkpoint"
    tied = tied or {}
    state, used = {}, set()
    for ours, shape in expected.items():
        parts = []
        for part in upstream(ours):
            if part not in tensors and tied.get(part) in tensors:
                part = tied[part]
            if part not in tensors:
                raise fail(folder, f"missing tensor {part!r} (needed for {ours})",
                           "the checkpoint is incomplete or was saved from a different config; re-save it with "
                           "save_pretrained")
            parts.append(part)
        value = torch.cat([tensors[p] for p in parts], dim=0) if len(parts) > 1 else tensors[parts[0]]
        if not fits(value, shape):
            raise fail(files.get(parts[0], folder), f"tensor {parts[0]!r} has shape {tuple(value.shape)}, expected "
                       f"{tuple(shape)} from config.json", "config.json and the weights disagree; use the config "
                       "saved with these weights")
        state[ours] = value.to(torch.float32).reshape(shape)
        used.update(parts)
    left = [name for name in tensors if name not in used]
    unexpected = sorted(name for name in left if not unused(name))
    if unexpected:
        raise fail(files.get(unexpected[0], folder), f"unexpected tensor {unexpected[0]!r} ({len(unexpected)} "
                   "unexpected in all)", "the weights belong to a different architecture or config than config.json "
                   "describes")
    return state, sorted(left)

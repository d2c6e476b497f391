"""The bundled demo checkpoint's export, cached: exported once, again only when the checkpoint changes."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from flamingo_edge.artifacts import read_export_record, sha256_of
from flamingo_edge.errors import ExportError
from flamingo_edge.models.checkpoint import DEMO, resolve_checkpoint

logger = logging.getLogger(__name__)


def cache_root() -> Path:
    """$FLAMINGO_EDGE_CACHE, else $XDG_CACHE_HOME/flamingo-edge, else ~/.cache/flamingo-edge."""
    if "FLAMINGO_EDGE_CACHE" in os.environ:
        return Path(os.environ["FLAMINGO_EDGE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "flamingo-edge"


def demo_export(on_graph=None) -> Path:
    """The export folder of the bundled checkpoint, exporting it first when there is none for these weights.

    The folder is named after the weights' sha256, so a changed checkpoint gets a fresh export.
    """
    checkpoint = resolve_checkpoint(DEMO)
    digest = sha256_of(checkpoint / "model.safetensors")[:16]
    folder = cache_root() / f"demo-export-{digest}"
    try:
        read_export_record(folder)
        return folder
    except ExportError:
        logger.info("exporting the demo checkpoint to %s", folder)
    from flamingo_edge.export.export import export_all

    export_all(checkpoint, folder, seed=0, on_graph=on_graph)
    return folder


def resolve_export(path: str | Path) -> Path:
    """An export folder a user named: a path, or "demo" for the bundled checkpoint's cached export."""
    return demo_export() if str(path) == DEMO else Path(path)

"""The bundled demo checkpoint's export, cached: exported once, again only when the checkpoint changes."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from flamingo_edge.artifacts import DEMO, EXPORT_RECORD, read_export_record, resolve_checkpoint, sha256_of
from flamingo_edge.errors import ExportError, UsageError
from flamingo_edge.extras import require

logger = logging.getLogger(__name__)


def cache_root() -> Path:
    """$FLAMINGO_EDGE_CACHE, else $XDG_CACHE_HOME/flamingo-edge, else ~/.cache/flamingo-edge."""
    if "FLAMINGO_EDGE_CACHE" in os.environ:
        return Path(os.environ["FLAMINGO_EDGE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "flamingo-edge"


def demo_export_folder() -> Path:
    """Where the bundled checkpoint's export is cached (it may not exist yet): named after the weights' sha256, so a
    changed checkpoint gets a fresh export.

    Raises:
        CheckpointError: the bundled checkpoint is missing from this installation.
    """
    checkpoint = resolve_checkpoint(DEMO)
    digest = sha256_of(checkpoint / "model.safetensors")[:16]
    return cache_root() / f"demo-export-{digest}"


def demo_export(on_graph=None) -> Path:
    """The export folder of the bundled checkpoint, exporting it first when there is none for these weights.

    The export is written under a temporary name and renamed when complete, so an interrupted first run leaves no
    folder behind, and the next run exports again.
    """
    folder = demo_export_folder()
    try:
        read_export_record(folder)
        return folder
    except ExportError:
        logger.info("exporting the demo checkpoint to %s", folder)
    require("torch", "export", f"exporting the demo checkpoint (once, to {folder})")
    from flamingo_edge.export.export import export_all

    if folder.is_dir() and not (folder / EXPORT_RECORD).is_file():  # left by a version that wrote in place
        shutil.rmtree(folder)
    # A broken export there (a file changed since) is replaced, once the new one is complete.
    try:
        export_all(resolve_checkpoint(DEMO), folder, seed=0, on_graph=on_graph, overwrite=folder.exists())
    except UsageError:
        if not (folder / EXPORT_RECORD).is_file():
            raise
        read_export_record(folder)  # another process exported it meanwhile: use that one
    return folder


def resolve_export(path: str | Path) -> Path:
    """An export folder a user named: a path, or "demo" for the bundled checkpoint's cached export (exported on
    first use)."""
    return demo_export() if str(path) == DEMO else Path(path)

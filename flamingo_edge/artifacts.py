"""Reading (and, later, atomically writing) the JSON files of checkpoints and of our own records. Torch-free."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flamingo_edge.errors import CheckpointError


def read_json(path: str | Path) -> dict[str, Any]:
    """A JSON object from a checkpoint file.

    Raises:
        CheckpointError: the file is missing, unreadable, not JSON, or not an object; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"{path.parent}: no {path.name}; a checkpoint is a save_pretrained folder with config.json and weights"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({error}); restore the file from the original checkpoint "
                              "or re-save it with save_pretrained") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(data).__name__}, not an object; "
                              "re-save the checkpoint with save_pretrained")
    return data

"""Reading a transformers `config.json` key by key, torch-free: what every family's reader (idefics_config,
mllama_config) does the same way. A key is read with the kind of value it must hold, and a wrong or missing one is a
CheckpointError that names the file, the key and the fix.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from flamingo_edge.config import FlamingoConfig
from flamingo_edge.config_checks import config_problems, describe, is_int, is_number
from flamingo_edge.errors import CheckpointError

logger = logging.getLogger(__name__)

# The activations the model implements: the keys of models/layers.py ACTIVATIONS (a test checks they agree).
ACTIVATION_NAMES = ("gelu", "gelu_tanh", "quick_gelu", "relu", "silu")
REQUIRED = object()  # the default of a key the config must have
FIX_VALUE = "fix that value (or restore the file saved with the checkpoint)"  # the message names the file
# What a config value must be: a test, and its description for the message.
_KINDS = {
    "count": (lambda v: is_int(v) and v > 0, "a positive integer"),
    "size": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    "positive": (lambda v: is_number(v) and v > 0, "a positive number"),
    "flag": (lambda v: v is None or isinstance(v, bool), "true or false"),  # null reads as false, as in transformers
    "token": (lambda v: v is None or (is_int(v) and v >= 0), "a token id (an integer >= 0) or null"),
    "name": (lambda v: isinstance(v, str), "a string"),
}


def fail(source: str, what: str, fix: str) -> CheckpointError:
    return CheckpointError(f"{source}: {what}; {fix}")


def checked(config: FlamingoConfig, source: str) -> FlamingoConfig:
    """`config`, once `config_problems` finds nothing wrong with it: what a key-by-key reading cannot see (sizes that
    must divide each other, layer indices in range), named in flamingo-edge's terms."""
    problems = config_problems(config)
    if problems:
        raise fail(source, "; ".join(problems) + " (flamingo-edge's names for the values read)", FIX_VALUE)
    return config


@dataclass(frozen=True)
class Section:
    """One object of config.json, read key by key with the kind of value each key must hold."""

    data: Mapping
    source: str
    family: str  # "IDEFICS", "Llama 3.2 Vision": what a complete config is, for messages
    prefix: str = ""  # "vision_config." for a nested object, for messages

    def nested(self, key: str) -> Section:
        """The object under `key` (empty when the key is absent or null)."""
        value = self.data.get(key)
        if value is not None and not isinstance(value, Mapping):
            raise fail(self.source, f"{self.prefix}{key} is {describe(value)}, expected a JSON object", FIX_VALUE)
        return Section(value or {}, self.source, self.family, f"{self.prefix}{key}.")

    def get(self, key: str, default, kind: str):
        """The value of `key` (`default` when absent; REQUIRED: it must be there), checked to be of `kind`."""
        if key not in self.data and default is REQUIRED:
            raise self.missing(key)
        value = self.data.get(key, default)
        test, expected = _KINDS[kind]
        if not test(value):
            raise fail(self.source, f"{self.prefix}{key} is {describe(value)}, expected {expected}", FIX_VALUE)
        return value

    def missing(self, key: str) -> CheckpointError:
        """The error for a required `key` that is not there."""
        return fail(self.source, f"required key '{self.prefix}{key}' is missing",
                    f"the file is not a complete {self.family} config")

    def activation(self, default: str, spelled: Mapping[str, str] | None = None) -> str:
        """`hidden_act`, one of ACTIVATION_NAMES (`spelled`: transformers' names for ours, e.g. gelu_pytorch_tanh)."""
        name = self.get("hidden_act", default, "name")
        name = (spelled or {}).get(name, name)
        if name not in ACTIVATION_NAMES:
            raise fail(self.source, f"{self.prefix}hidden_act={name!r} is not supported",
                       f"supported: {sorted(ACTIVATION_NAMES)}")
        return name

    def log_ignored(self, used: set[str]) -> None:
        """Log the keys flamingo-edge does not read (they have no effect on inference)."""
        ignored = sorted(set(self.data) - used)
        if ignored:
            logger.info("%s: %s keys not used by flamingo-edge (no effect on inference): %s", self.source,
                        self.prefix.rstrip(".") or "top-level", ignored)

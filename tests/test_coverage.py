"""Meta-tests: every CLI subcommand and every importer has tests; the package imports stay light."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import flamingo_edge.models.importers as importers
from flamingo_edge.cli.main import SUBCOMMANDS

TESTS = Path(__file__).parent


def test_every_cli_subcommand_has_a_test_file():
    """tests/cli/test_<name>.py, or for a command with its own test folder (serving: tests/serving/), there."""
    names = {path.name for path in TESTS.rglob("test_*.py")}
    missing = [name for name in SUBCOMMANDS if f"test_{name.replace('-', '_')}.py" not in names]
    assert not missing, f"CLI subcommands without a tests/**/test_<name>.py: {missing}"


def test_every_importer_is_exercised_by_a_parity_test():
    families = [module.name for module in pkgutil.iter_modules(importers.__path__)]
    missing = [name for name in families if not (TESTS / "models" / f"test_{name}_parity.py").is_file()]
    assert families and not missing, f"importers without tests/models/test_<family>_parity.py: {missing}"


def test_importing_the_package_and_cli_imports_neither_torch_nor_tensorrt():
    code = (
        "import sys, flamingo_edge, flamingo_edge.errors, flamingo_edge.cli.main; "
        "heavy = [m for m in ('torch', 'tensorrt', 'transformers') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_test_file_names_are_unique():
    """Test folders have no __init__.py, so two test files with one basename break collection of the whole suite."""
    names = [path.name for path in TESTS.rglob("test_*.py")]
    assert len(names) == len(set(names)), sorted({n for n in names if names.count(n) > 1})

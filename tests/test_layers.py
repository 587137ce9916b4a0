"""The package's layers point down: `lint-imports` checks the contracts in pyproject.toml
([tool.importlinter]: the layer order, and no import cycles between sibling modules)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    assert lint.exists(), "lint-imports not found next to this Python: pip install -e '.[dev]' (or make setup)"
    done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_registry_is_declared_not_imported_for_effect():
    """Every method comes from a catalog module's METHODS; importing a catalog module registers nothing."""
    from leapdecode import methods
    from leapdecode.catalog.spec import MethodSpec

    declared = [spec.name for family in methods.FAMILIES for spec in family.METHODS]
    assert sorted(declared) == [spec.name for spec in methods.all_methods()]
    assert len(set(declared)) == len(declared)
    assert all(isinstance(spec, MethodSpec) for family in methods.FAMILIES for spec in family.METHODS)

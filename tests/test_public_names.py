"""The package's public names are the core's, for the lazy loader and for type checkers alike."""

import ast
from pathlib import Path

import samedge
import samedge.core
import samedge.experiment


def _type_checking_names() -> set[str]:
    tree = ast.parse(Path(samedge.__file__).read_text(encoding="utf-8"))
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")
    return {a.asname or a.name for n in block.body if isinstance(n, ast.ImportFrom) for a in n.names}


def test_public_names_are_the_core_names():
    assert set(samedge._CORE_NAMES) == set(samedge.core.__all__)
    assert len(samedge._CORE_NAMES) == len(set(samedge._CORE_NAMES))
    assert set(samedge.__all__) == {"__version__", "BadInput", *samedge.core.__all__}
    assert _type_checking_names() == set(samedge.core.__all__)


def test_every_public_name_resolves_to_the_core_object():
    for name in samedge.core.__all__:
        assert getattr(samedge, name) is getattr(samedge.core, name)


def test_the_experiment_face_resolves_every_name_to_its_object():
    import importlib

    import samedge.experiment.run.runner  # noqa: F401  (the sub-package 'run' is now an attribute too)

    for name in samedge.experiment.__all__:
        module, _, attr = samedge.experiment._PUBLIC[name].partition(":")
        assert getattr(samedge.experiment, name) is getattr(importlib.import_module(module), attr or name)
    assert callable(samedge.experiment.run_experiment)

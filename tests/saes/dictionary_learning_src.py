"""dictionary_learning's own modules, imported from the installed package without its ``__init__``.

The package ``__init__`` imports nnsight (through ``buffer.py``), which pm_lens does not install;
``dictionary.py``, ``config.py``, ``trainers/trainer.py``, ``trainers/top_k.py`` and
``trainers/batch_top_k.py`` import only torch and einops. Install the library with
``pip install --no-deps dictionary-learning==0.1.0``; tests that need it skip when it is absent.
"""

import importlib
import importlib.util
import sys
import types
from pathlib import Path
from types import ModuleType

import pytest

# A private name, so that a real `import dictionary_learning` elsewhere is left alone.
_PACKAGE = "_dictionary_learning_src"


def dictionary_learning_module(name: str) -> ModuleType:
    """``dictionary_learning.<name>`` (e.g. ``"trainers.top_k"``), or a pytest skip."""
    spec = importlib.util.find_spec("dictionary_learning")  # finds the package, runs none of it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("dictionary-learning is not installed (pip install --no-deps dictionary-learning==0.1.0)")
    root = Path(spec.submodule_search_locations[0])
    # Empty packages over its folders: relative imports (..dictionary, ..config) resolve to its
    # files without running any __init__.
    for package, folder in ((_PACKAGE, root), (f"{_PACKAGE}.trainers", root / "trainers")):
        if package not in sys.modules:
            module = types.ModuleType(package)
            module.__path__ = [str(folder)]
            sys.modules[package] = module
    return importlib.import_module(f"{_PACKAGE}.{name}")

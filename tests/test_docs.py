"""Every docstring example in the package runs and prints what it says."""

import doctest
import importlib
import pkgutil

import pytest

import optax_ext
import scaling


def _modules():
    for package in (optax_ext, scaling):
        yield package.__name__
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if not info.name.endswith("__main__"):
                yield info.name


@pytest.mark.parametrize("name", sorted(_modules()))
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"


def test_public_api_is_declared():
    for package in (optax_ext, scaling):
        for name in package.__all__:
            assert hasattr(package, name), f"{package.__name__}.__all__ names missing {name}"


def test_readme_names_exist():
    """Every `ox.name` and `scaling.name` the README shows is public API."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    for prefix, package in (("ox", optax_ext), ("scaling", scaling)):
        for name in set(re.findall(rf"\b{prefix}\.([A-Za-z_]\w*)", text)):
            assert name in package.__all__, f"README uses {prefix}.{name}, not in __all__"


def test_readme_commands_match_ci():
    """The README's test command is exactly what .ci/run runs."""
    import pathlib

    root = pathlib.Path(__file__).parents[1]
    readme, ci = (root / "README.md").read_text(), (root / ".ci/run").read_text()
    assert "python -m optax_ext.demo" in readme
    assert 'pip install -e ".[test]" && python -m pytest -n 2 --nbmake' in readme
    assert 'python -m pip install --quiet -e ".[test]"' in ci
    assert "python -m pytest -n 2 --nbmake" in ci

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
    """Every `ox.name`, `ox.submodule.name` and `scaling.name` that README.md and the
    pages of docs/ show is public."""
    import importlib
    import pathlib
    import re

    root = pathlib.Path(__file__).parents[1]
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    assert len(pages) > 1, "docs/ has no pages"
    text = "\n".join(page.read_text() for page in pages)
    text = re.sub(r"[\w/.-]+\.md\b", "", text)  # file names such as scaling.md
    for name, attr in set(re.findall(r"\box\.([A-Za-z_]\w*)(?:\.([A-Za-z_]\w*))?", text)):
        if name in optax_ext.SUBMODULES:
            module = importlib.import_module(f"optax_ext.{name}")
            assert not attr or hasattr(module, attr), f"README uses ox.{name}.{attr}"
        else:
            assert name in optax_ext.__all__, f"README uses ox.{name}, not in __all__"
    for name in set(re.findall(r"\bscaling\.([A-Za-z_]\w*)", text)):
        assert name in scaling.__all__, f"README uses scaling.{name}, not in __all__"


def test_top_level_is_small_and_light():
    """At most 60 top-level names; ``import optax_ext`` loads no flax, orbax or tqdm."""
    import subprocess
    import sys

    assert len(optax_ext.__all__) <= 60, len(optax_ext.__all__)
    assert not set(optax_ext.__all__) & set(optax_ext.SUBMODULES)
    probe = (
        "import sys, optax_ext as ox; heavy = ('flax', 'orbax', 'tqdm');"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy));"
        "ox.training.make_train_step; print('flax' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["[]", "True"], out.stdout
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        optax_ext.nope  # noqa: B018


def test_readme_commands_match_ci():
    """The README's test command is exactly what .ci/run runs."""
    import pathlib

    root = pathlib.Path(__file__).parents[1]
    readme, ci = (root / "README.md").read_text(), (root / ".ci/run").read_text()
    assert "python -m optax_ext.demo" in readme
    assert 'pip install -e ".[test]" && python -m pytest -n 2 --nbmake' in readme
    assert 'python -m pip install --quiet -e ".[test]"' in ci
    assert "python -m pytest -n 2 --nbmake" in ci

"""The notebooks are what ``notebooks/make_notebooks.py`` writes, and run from anywhere."""

import json
import sys
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
sys.path.insert(0, str(NOTEBOOKS))

import make_notebooks  # noqa: E402


def test_every_notebook_is_written_by_the_one_script():
    assert sorted(make_notebooks.NOTEBOOKS) == sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    for name, cells in make_notebooks.NOTEBOOKS.items():
        committed = json.loads((NOTEBOOKS / name).read_text())["cells"]
        sources = ["".join(c["source"]) for c in committed]
        kinds = [c["cell_type"] for c in committed]
        assert sources == [c[3:] if c.startswith("md:") else c for c in cells], name
        assert kinds == ["markdown" if c.startswith("md:") else "code" for c in cells], name
        assert not any(c.get("outputs") for c in committed), f"{name} has outputs"


def test_no_notebook_depends_on_its_working_directory():
    for name, cells in make_notebooks.NOTEBOOKS.items():
        code = [c for c in cells if not c.startswith("md:")]
        for text in code:
            assert '"../' not in text and "'../" not in text and "chdir" not in text, name

"""Every Python block of README.md and docs/*.md runs as written, and so do their
``python -m scaling`` lines.

Blocks are grouped by the heading above them. Each group runs in an empty namespace
(only ``CKPT``, the checkpoint folder: ``"/abs/ckpt..."`` in a block becomes a temporary
folder), after the blocks of its file's setup section (a heading that starts with
"Setup"), in file order: so a block may use only what it, an earlier block of its own
section or its page's visible setup defines. Blocks that need several devices run on the
8 fake CPU devices that tests/conftest.py sets up.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks(text: str) -> list[tuple[str, str]]:
    """``(section heading, code)`` for every fenced Python block, in file order."""
    blocks, heading = [], ""
    for part in re.split(r"(^```python\n.*?^```$)", text, flags=re.S | re.M):
        if part.startswith("```python"):
            blocks.append((heading, part.removeprefix("```python\n").removesuffix("```")))
        else:
            headings = re.findall(r"^#+ (.+)$", part, flags=re.M)
            heading = headings[-1] if headings else heading
    return blocks


def is_setup(heading: str) -> bool:
    return heading.startswith("Setup")


def scaling_command_lines(text: str) -> list[str]:
    lines = []
    for block in re.findall(r"^```bash\n(.*?)^```$", text, flags=re.S | re.M):
        for line in block.splitlines():
            for command in line.split(";"):
                command = command.split("#")[0].strip()
                if command.startswith("python -m scaling"):
                    lines.append(command)
    return lines


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


BLOCKS = {_name(f): python_blocks(f.read_text()) for f in FILES}
SECTIONS = [
    (name, heading)
    for name, blocks in BLOCKS.items()
    for heading in dict.fromkeys(h for h, _ in blocks)
    if not is_setup(heading) or all(is_setup(h) for h, _ in blocks)
]
COMMANDS = sorted({c for f in FILES for c in scaling_command_lines(f.read_text())})


def test_every_page_has_blocks_to_run():
    assert {"README.md", "docs/optimizers.md", "docs/muon.md", "docs/precision.md"} <= set(BLOCKS)
    for name, blocks in BLOCKS.items():
        if name != "docs/README.md":
            assert blocks, f"{name} has no Python block"
    assert len(COMMANDS) >= 3


def test_links_resolve():
    """Every relative link of README.md and docs/*.md names a file of the repository,
    and README.md and docs/README.md link to every docs page."""
    for path in FILES:
        text = path.read_text()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" not in target:
                assert (path.parent / target).exists(), f"{_name(path)} links to {target}"
    for index in (ROOT / "README.md", ROOT / "docs/README.md"):
        text = index.read_text()
        for page in FILES[1:]:
            if page.name != "README.md":
                link = page.name if index.parent == page.parent else f"docs/{page.name}"
                assert f"({link})" in text, f"{_name(index)} does not link to {link}"


def _id(name: str, section: str) -> str:
    heading = re.sub(r" \(.*", "", section)  # without its link
    return f"{name}::{heading[:40]}"


@pytest.mark.parametrize("name, section", SECTIONS, ids=[_id(*s) for s in SECTIONS])
def test_section_runs_as_written(name, section, tmp_path):
    namespace = {"CKPT": str(tmp_path / "ckpt")}
    blocks = BLOCKS[name]
    setup = [code for heading, code in blocks if is_setup(heading) and heading != section]
    for code in [*setup, *(code for heading, code in blocks if heading == section)]:
        code = code.replace('"/abs/ckpt', 'CKPT + "')
        exec(compile(code, f"{name} [{section}]", "exec"), namespace)


@pytest.mark.parametrize("command", COMMANDS)
def test_scaling_command_runs(command):
    args = shlex.split(command)[1:]
    if any(a.endswith(".jsonl") for a in args):
        pytest.skip("needs the demo's log; the noise command is tested in tests/scaling")
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr

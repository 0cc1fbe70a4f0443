"""The code map in CONTRIBUTING.md is generated from the module docstrings, so it cannot go stale.

After adding, moving or redescribing a module: ``python tests/test_code_map.py`` rewrites the map.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONTRIBUTING = ROOT / "CONTRIBUTING.md"
START, END = "<!-- code-map:start -->", "<!-- code-map:end -->"


def summary(path: Path) -> str:
    """The first sentence of a module's docstring, on one line."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    match = re.match(r"(.+?\.)(\s|$)", paragraph)
    return (match.group(1) if match else paragraph).rstrip(".")


def code_map() -> str:
    """Every module of ``hiap_kernels`` and ``hiap``, folder by folder, with its docstring's first sentence."""
    lines = ["| module | what it is |", "|---|---|"]
    for package in ("hiap_kernels", "hiap"):
        for path in sorted((ROOT / package).rglob("*.py"), key=lambda p: (p.parent.as_posix(), p.name)):
            lines.append(f"| `{path.relative_to(ROOT).as_posix()}` | {summary(path).replace('|', '/')} |")
    return "\n".join(lines)


def _section(text: str) -> str:
    start, end = text.index(START) + len(START), text.index(END)
    return text[start:end].strip("\n")


def test_contributing_holds_the_current_code_map():
    assert _section(CONTRIBUTING.read_text()) == code_map(), \
        "CONTRIBUTING.md's code map is stale: run python tests/test_code_map.py"


def test_every_module_says_what_it_is():
    missing = [p.relative_to(ROOT).as_posix() for package in ("hiap", "hiap_kernels")
               for p in (ROOT / package).rglob("*.py") if not summary(p)]
    assert not missing, f"modules without a docstring: {missing}"


if __name__ == "__main__":
    text = CONTRIBUTING.read_text()
    start, end = text.index(START) + len(START), text.index(END)
    CONTRIBUTING.write_text(text[:start] + "\n" + code_map() + "\n" + text[end:])
    print(f"rewrote the code map in {CONTRIBUTING}", file=sys.stderr)

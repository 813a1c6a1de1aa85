"""The library's layout: imports run one way (a chapter's module imports only earlier chapters' modules, at module
level; the command line is the top floor), no import cycles, importing has no side effects, no exported cell is long."""
import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import nanogpt_plus

PACKAGE = Path(nanogpt_plus.__file__).parent
NBS = PACKAGE.parent / "nbs"
MODULES = sorted(p for p in PACKAGE.glob("*.py") if not p.name.startswith("_"))
TOP_FLOOR = {"cli"}  # may import any module


def chapter(path: Path) -> tuple[int, str]:
    "The chapter of a generated module, as (number, letter): 02b_bpe.ipynb -> (2, 'b')."
    m = re.search(r"File to edit: \.\./nbs/(\d+)([a-z]?)_", path.read_text())
    assert m, f"{path.name} names no notebook"
    return int(m.group(1)), m.group(2)


def package_imports(tree):
    "(node, module) for every import of a nanogpt_plus module in `tree`, at any depth."
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("nanogpt_plus")):
            base = node.module.removeprefix("nanogpt_plus").lstrip(".") if node.module else ""
            for name in ([base] if base else [a.name for a in node.names]): yield node, name.split(".")[0]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("nanogpt_plus."): yield node, a.name.split(".")[1]


def graph() -> dict[str, set[str]]:
    return {p.stem: {name for _, name in package_imports(ast.parse(p.read_text())) if name and name != p.stem}
            for p in MODULES}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.stem)
def test_imports_run_one_way(path):
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    chapters = {p.stem: chapter(p) for p in MODULES}
    for node, name in package_imports(tree):
        where = f"{path.name}:{node.lineno} imports {name or '__version__'}"
        assert id(node) in top, f"{where} inside a function or class: import at module level"
        if name in chapters and path.stem not in TOP_FLOOR:
            assert chapters[name] <= chapters[path.stem], f"{where}, a later chapter"


def test_no_import_cycles():
    g, done, stack = graph(), set(), []

    def visit(m):
        assert m not in stack, f"import cycle: {' -> '.join(stack[stack.index(m):] + [m])}"
        if m in done: return
        stack.append(m)
        for n in g.get(m, ()): visit(n)
        stack.pop()
        done.add(m)
    for m in g: visit(m)


def test_the_rule_is_checked_for_real():
    "The checks above catch what they should: a later chapter, a function-level import, a cycle."
    bad = ast.parse("from nanogpt_plus.cli import main\ndef f():\n    from .train import Trainer\n")
    assert [name for _, name in package_imports(bad)] == ["cli", "train"]
    assert graph()["train"] >= {"checkpoint", "data", "optim"}


def test_importing_has_no_side_effects(tmp_path):
    "Importing every module sets up no logging, writes no file, sets no environment variable and no signal handler."
    code = ("import logging, os, signal, sys\nenv, handlers = dict(os.environ), logging.getLogger().handlers[:]\n"
            "sig = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)\n"
            f"for m in {[p.stem for p in MODULES]!r}: __import__('nanogpt_plus.' + m)\n"
            "assert dict(os.environ) == env and logging.getLogger().handlers == handlers\n"
            "assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == sig\n"
            "print(sorted(os.listdir('.')))")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def exported_cells():
    for nb in sorted(NBS.glob("*.ipynb")):
        for i, cell in enumerate(json.loads(nb.read_text())["cells"]):
            src = "".join(cell["source"])
            if cell["cell_type"] == "code" and re.match(r"#\|\s*export", src): yield nb.name, i, src


def test_exported_cells_are_short():
    long = [f"{nb} cell {i}: {src.count(chr(10)) + 1} lines" for nb, i, src in exported_cells() if src.count("\n") + 1 > 60]
    assert not long, "exported cells of one idea, about 50 lines at most: " + "; ".join(long)

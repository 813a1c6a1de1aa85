"""Every chapter must run where only the package is installed (Colab: `pip install` and the notebook, nothing else of
the repository). Stored results that the chapters read ship inside the package (`nanogpt_plus/results/`).

The first test reads every notebook and fails on a code cell that reaches for a file of the repository outside the
package (`../benchmarks/...`, `../tools/...`). The second runs the chapters that read stored results in a temporary
directory holding only the notebook, with `PYTHONPATH` pointing at the package alone, slow cells left out."""
import json
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"
# a path that leaves the notebook's folder for a part of the repository that Colab does not have
OUTSIDE = re.compile(r"""\.\./+(benchmarks|tools|shared|tests|nanogpt_plus|nbs)\b|\.\.["']\s*\)\s*/\s*["'](benchmarks|tools|shared|tests)""")


def code_cells(path: Path):
    for i, cell in enumerate(json.loads(path.read_text(encoding="utf-8"))["cells"]):
        if cell["cell_type"] == "code": yield i, "".join(cell["source"])


def outside_reads(path: Path) -> list[str]:
    "`cell N: line` for each line of a code cell of `path` that names a repository path outside the package."
    return [f"cell {i}: {line.strip()}" for i, src in code_cells(path) for line in src.splitlines() if OUTSIDE.search(line)]


def test_the_check_sees_outside_paths(tmp_path):
    nb = {"cells": [{"cell_type": "code", "source": ['rows = Path("../benchmarks/ablation.jsonl").read_text()\n']},
                    {"cell_type": "code", "source": ['subprocess.run([sys.executable, "../tools/run_notebook.py"])']},
                    {"cell_type": "code", "source": ['x = files("nanogpt_plus") / "results" / "ablation.jsonl"']},
                    {"cell_type": "markdown", "source": ["`../benchmarks/speedrun.py` in prose is fine"]}],
          "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    path = tmp_path / "x.ipynb"
    path.write_text(json.dumps(nb))
    assert [r.split(":")[0] for r in outside_reads(path)] == ["cell 0", "cell 1"]


@pytest.mark.parametrize("path", sorted(NBS.glob("*.ipynb")), ids=lambda p: p.name)
def test_no_notebook_reads_the_repository_outside_the_package(path):
    bad = outside_reads(path)
    assert not bad, (f"{path.name} reads files that a Colab runtime (the package alone) does not have; ship them in "
                     f"nanogpt_plus/results/ and read them with importlib.resources: " + "; ".join(bad))


# the chapters that read results stored by the benchmark scripts; 13 takes about half a minute, the others longer
LONG = [pytest.mark.slow, pytest.mark.long]  # minutes each: `pytest -m long tests` runs them
STORED_RESULTS = ["13_speedrun.ipynb", "13b_small_data.ipynb", pytest.param("12_modern_gpt.ipynb", marks=LONG),
                  pytest.param("14_lora.ipynb", marks=LONG), pytest.param("15_distributed.ipynb", marks=LONG),
                  pytest.param("19_evaluate.ipynb", marks=LONG)]


@pytest.mark.parametrize("name", STORED_RESULTS)
def test_chapter_runs_with_only_the_package(name, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")

    class SkipSlow(nbclient.NotebookClient):
        async def async_execute_cell(self, cell, cell_index, execution_count=None, store_history=True):
            if cell.cell_type == "code" and any(l.strip() == "#| slow" for l in cell.source.splitlines()): return cell
            return await super().async_execute_cell(cell, cell_index, execution_count, store_history)

    # the package alone: a folder that holds nanogpt_plus (a link to it) and nothing else of the repository
    site = tmp_path / "site"
    site.mkdir()
    (site / "nanogpt_plus").symlink_to(ROOT / "nanogpt_plus", target_is_directory=True)
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(NBS / name, work / name)
    monkeypatch.setenv("PYTHONPATH", str(site))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(work / name, as_version=4)
    SkipSlow(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(work)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors

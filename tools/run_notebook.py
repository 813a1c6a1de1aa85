"""Run chapters top to bottom in a Jupyter kernel and save their outputs, as "Restart & Run All" would.

Cells flagged `#| slow` keep the outputs they have unless `--slow` is given (`#| long` ones unless `--long`), so a
small edit to a chapter does not mean re-running its five-minute recipe. Run `nbdev-clean` afterwards.

usage: python tools/run_notebook.py nbs/08_training.ipynb [more notebooks] [--slow] [--long]
"""
import argparse
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient


def has_flag(cell, flag: str) -> bool:
    return cell.cell_type == "code" and any(l.strip() == f"#| {flag}" for l in cell.source.splitlines())


class KeepSlowOutputs(NotebookClient):
    "A notebook client that leaves `#| slow` (and `#| long`) cells, source and stored outputs, untouched."
    run_slow = run_long = False

    async def async_execute_cell(self, cell, cell_index, execution_count=None, store_history=True):
        if has_flag(cell, "long") and not self.run_long: return cell
        if has_flag(cell, "slow") and not self.run_slow: return cell
        return await super().async_execute_cell(cell, cell_index, execution_count, store_history)


def run(path: Path, slow: bool, timeout: int, long: bool = False) -> None:
    nb = nbformat.read(path, as_version=4)
    client = KeepSlowOutputs(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    client.run_slow, client.run_long = slow, long
    client.execute()  # raises CellExecutionError, naming the cell, if one fails; the file is then left as it was
    nbformat.write(nb, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("notebooks", nargs="+", type=Path)
    p.add_argument("--slow", action="store_true", help="run the `#| slow` cells too")
    p.add_argument("--long", action="store_true", help="run the `#| long` cells too (chapter 13's 1.5e14 speed-run)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per cell (default: %(default)s)")
    args = p.parse_args(argv)
    for path in args.notebooks:
        if not path.is_file(): p.error(f"{path} is not a file")
        print(f"running {path}{' (slow cells too)' if args.slow else ''}", file=sys.stderr)
        run(path, args.slow, args.timeout, args.long)
    return 0


if __name__ == "__main__":
    sys.exit(main())

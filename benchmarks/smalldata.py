"""Chapter 13b's results file: one JSON line per finished run of the small-data study.

Reads run directories that `nanogpt-plus train --out-dir DIR` finished (metrics.jsonl with the loss over the whole
validation split, trainer_state.pt) and writes, for each, the line chapter 13b reads: `technique`, `seed`,
`val_loss` (whole validation split), `flops`, `steps`, `tokens`, `train_split_tokens`, `epochs`, `weights_step`
(the step whose weights were kept: the last one, or early stopping's choice) and `curve`, the evaluations as
`(flops, val_loss, train_loss)`. Nothing is trained here.

    python benchmarks/smalldata.py --run baseline=runs/sr150/seed-1337 --run dropout=runs/sr150-drop0.1/seed-1337
    python benchmarks/smalldata.py --baseline sr150 '/work/runs/sr150*/seed-*' --out nanogpt_plus/results/smalldata.jsonl

A glob names each run by the directory above it: `--baseline NAME` (default sr150) becomes `baseline`, and
`NAME-xyz` becomes `xyz`. Runs that have not finished (no whole-split loss yet) are skipped with a note on stderr.
`--out FILE` replaces FILE (written whole, then renamed); without it the lines go to stdout.
"""
import argparse
import glob
import json
import os
import sys
from pathlib import Path

from nanogpt_plus.smalldata import run_record


def technique_of(run_dir: Path, baseline: str) -> str:
    "The name of the technique a globbed run tests: its parent directory's name, less the baseline's prefix."
    name = run_dir.parent.name
    return "baseline" if name == baseline else name.removeprefix(f"{baseline}-")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("globs", nargs="*", metavar="GLOB", help="run directories, as a shell glob (quote it)")
    p.add_argument("--run", action="append", default=[], metavar="NAME=DIR", help="one run and its technique's name")
    p.add_argument("--baseline", default="sr150", help="the directory name of the baseline's runs (default: sr150)")
    p.add_argument("--out", metavar="FILE", help="write the lines to FILE (replacing it) instead of stdout")
    args = p.parse_args(argv)
    runs = []
    for spec in args.run:
        name, eq, d = spec.partition("=")
        if not eq or not name or not d: p.error(f"--run {spec!r}: expected NAME=DIR")
        runs.append((name, Path(d)))
    for pattern in args.globs:
        found = sorted(Path(d) for d in glob.glob(pattern) if Path(d).is_dir())
        if not found: print(f"note: {pattern} matches no directory", file=sys.stderr)
        runs += [(technique_of(d, args.baseline), d) for d in found]
    lines = []
    for name, d in runs:
        try: lines.append(run_record(name, d))
        except (ValueError, OSError) as e: print(f"note: skipped {d}: {e}", file=sys.stderr)
    if not lines: p.exit(2, "error: no finished run found: give run directories that `train --out-dir` finished\n")
    lines.sort(key=lambda r: (r["technique"] != "baseline", r["technique"], r["seed"]))
    text = "".join(json.dumps(r) + "\n" for r in lines)
    if args.out is None: sys.stdout.write(text)
    else:
        tmp = Path(f"{args.out}.tmp")
        tmp.write_text(text)
        os.replace(tmp, args.out)  # a reader never sees half a file
        print(f"wrote {len(lines)} runs to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

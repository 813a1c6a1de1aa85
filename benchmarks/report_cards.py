"""Report cards (chapter 19) of the models the book ships, side by side.

The models: `recipe` (chapter 8's recipe, `nanogpt-plus train --config shakespeare-char`), `speedrun-5e13` and
`speedrun-1.5e14` (chapter 13's two recipes, `--config speedrun-5e13` / `--config speedrun-1.5e14`), `lora` (chapter
14's command-line fine-tune, here of the recipe model: a rank-4 LoRA adapter trained for 60 steps on *Romeo and
Juliet*) and `lora-int8` (that adapter merged into its base with `nanogpt-plus merge`, then saved with int8 weights by
`nanogpt-plus quantize --dtype int8`). Each is trained here, in --work, unless `--from-dir NAME=DIR` names a directory
that already holds it (a model made from another, `lora` or `lora-int8`, is then made from that one). Each is scored
with `nanogpt-plus eval`'s suite, and one JSON line per model is appended to --out: the report (report.json's content)
with the model's name, its parameters, its size on disk and how it was made.

    python benchmarks/report_cards.py --suite full --out nanogpt_plus/results/report_cards.jsonl \\
        --from-dir speedrun-5e13=/runs/sr50/seed-1337 --from-dir speedrun-1.5e14=/runs/sr150/seed-1337
"""
import argparse
import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

MODELS = ("recipe", "speedrun-5e13", "speedrun-1.5e14", "lora", "lora-int8")
RECIPES = MODELS[:3]  # trained from scratch by a recipe of the package
LORA = ["--use-lora", "--lora-rank", "4", "--lora-alpha", "8", "--learning-rate", "3e-3", "--max-iters", "60",
        "--lr-decay-iters", "60", "--eval-interval", "20", "--seed", "1337"]  # chapter 14's command-line fine-tune


def parse_from_dirs(items: list[str]) -> dict[str, Path]:
    "`NAME=DIR` pairs as a dict; a clear error for a malformed pair, an unknown model or a directory that is not there."
    out = {}
    for item in items:
        name, sep, directory = item.partition("=")
        if not sep or not name or not directory:
            raise ValueError(f"--from-dir {item!r} is not NAME=DIR (for example speedrun-5e13=runs/sr50)")
        if name not in MODELS: raise ValueError(f"--from-dir names no model {name!r}: use one of {', '.join(MODELS)}")
        if name in out: raise ValueError(f"--from-dir gives {name} twice")
        if not Path(directory).is_dir(): raise ValueError(f"--from-dir {name}: there is no directory {directory}")
        out[name] = Path(directory)
    return out


def parse_models(text: str) -> list[str]:
    "A comma-separated list of model names, in the order given; a clear error for an unknown one."
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names: raise ValueError(f"--models: unknown {', '.join(unknown) or '(none given)'}: use {', '.join(MODELS)}")
    return names


def nanogpt_plus(*argv) -> None:
    "Run `nanogpt-plus ARGV` in a new process with one thread; stop with its message if it fails."
    done = subprocess.run([sys.executable, "-m", "nanogpt_plus", *map(str, argv)], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    if done.returncode: raise SystemExit(f"nanogpt-plus {' '.join(map(str, argv[:2]))} failed: {done.stderr.strip()}")


def romeo_text() -> str:
    "Romeo and Juliet out of tiny-shakespeare (chapter 14's split)."
    from nanogpt_plus.data import tiny_shakespeare
    text = tiny_shakespeare()
    return text[text.index("SAMPSON:\nGregory, o' my word"):text.index("WARWICK:\nI wonder how the king escaped")]


def make(name: str, dirs: dict[str, Path], hows: dict[str, str], work: Path) -> Path:
    "The directory of model `name`: the one `dirs` has, or one made now in `work` (and its models first); `hows` says how."
    recipe = f"nanogpt-plus train --config {'shakespeare-char' if name == 'recipe' else name}"
    if name in dirs:  # the settings it was trained with are in its run.toml, which the card keeps
        hows.setdefault(name, f"given by --from-dir (expected: {recipe})" if name in RECIPES else "given by --from-dir")
        return dirs[name]
    out = work / name
    if name in RECIPES:
        how = recipe
        nanogpt_plus(*how.split()[1:], "--out-dir", out, "--no-progress")
    elif name == "lora":
        base = make("recipe", dirs, hows, work)
        (work / "romeo.txt").write_text(romeo_text(), encoding="utf-8")
        how = "nanogpt-plus train gpt --init-from RECIPE --data romeo.txt " + " ".join(LORA)
        nanogpt_plus("train", "gpt", "--init-from", base, "--data", work / "romeo.txt", *LORA, "--out-dir", out, "--no-progress")
    else:  # lora-int8
        adapter = make("lora", dirs, hows, work)
        nanogpt_plus("merge", adapter, "--out-dir", work / "lora-merged", "--overwrite")
        nanogpt_plus("quantize", "gpt", "--checkpoint", work / "lora-merged", "--dtype", "int8", "--out-dir", out)
        how = "nanogpt-plus merge LORA --out-dir MERGED; nanogpt-plus quantize gpt --checkpoint MERGED --dtype int8"
    dirs[name], hows[name] = out, how
    return out


def describe(directory: Path) -> dict:
    "Parameters (of the float model it computes with) and bytes of weights on disk of the model in `directory`."
    import torch
    from nanogpt_plus.evaluate import load_any
    from nanogpt_plus.gpt import GPT
    model, _ = load_any(directory)
    with torch.device("meta"): shape_only = GPT(model.config)  # an int8 copy's weights are buffers: count the float shape
    weights = [p for p in ("model.safetensors", "adapter.safetensors") if (directory / p).is_file()]
    return {"parameters": sum(p.numel() for p in shape_only.parameters()),
            "weights_bytes": sum((directory / p).stat().st_size for p in weights)}


def card(name: str, directory: Path, how: str, suite: str, work: Path) -> dict:
    "One model's report card, as a JSON-able dict."
    from nanogpt_plus.evaluate import evaluate_checkpoint
    start = time.perf_counter()
    report = evaluate_checkpoint(directory, suite, out_dir=work / "reports" / name, progress=False)
    return {"model": name, **describe(directory), "made": how, **trained(directory), "eval_s": round(time.perf_counter() - start, 1),
            "load": round(os.getloadavg()[0], 1), **report}


def trained(directory: Path) -> dict:
    "What `train` recorded in `directory`: its settings (run.toml), its steps and its final whole-split validation loss."
    out = {}
    if (directory / "run.toml").is_file(): out["settings"] = tomllib.loads((directory / "run.toml").read_text())
    if (directory / "metrics.jsonl").is_file():
        last = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines() if line.strip()][-1]
        if "val_loss_full" in last: out["steps"], out["val_loss_full"] = last["step"], last["val_loss_full"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of: {', '.join(MODELS)}")
    p.add_argument("--from-dir", action="append", default=[], metavar="NAME=DIR",
                   help="use the model already in DIR instead of training it (repeatable)")
    p.add_argument("--suite", default="quick", help="the eval suite: quick or full")
    p.add_argument("--work", default="checkpoints/report-cards", help="where models are trained and reports written")
    p.add_argument("--out", required=True, help="JSON lines file, appended to")
    args = p.parse_args(argv)
    try:
        names, dirs = parse_models(args.models), parse_from_dirs(args.from_dir)
        from nanogpt_plus.evaluate import SUITES
        if args.suite not in SUITES: raise ValueError(f"--suite {args.suite!r}: use one of {', '.join(SUITES)}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import torch
    from nanogpt_plus.checkpoint import CheckpointError
    torch.set_num_threads(1)
    work = Path(args.work); work.mkdir(parents=True, exist_ok=True)
    hows = {}
    for name in names:
        directory = make(name, dirs, hows, work)
        try: r = card(name, directory, hows[name], args.suite, work)
        except (CheckpointError, OSError, ValueError) as e:  # not a model, or reports that cannot be written
            print(f"error: {name}: {e}", file=sys.stderr)
            return 2
        with open(args.out, "a") as f: f.write(json.dumps(r) + "\n")
        print(f"{name:>16}: {r['parameters']:,} parameters; bits/char validation {r['bpc']['validation']:.3f}, "
              f"unseen plays {r['bpc']['unseen plays']:.3f}, poems {r['bpc']['poems']:.3f} ({r['eval_s']} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

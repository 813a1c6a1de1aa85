"Chapter 13b's training options through the command line: --ema, --holdout-frac, --early-stop, --patience."
import json
import random

import pytest
import torch

from nanogpt_plus import cli
from nanogpt_plus.checkpoint import load_checkpoint, load_trainer_state
from nanogpt_plus.train import read_metrics

CORPUS = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
TINY = ["gpt", "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--context-size", "16", "--batch-size", "4",
        "--eval-iters", "2", "--eval-interval", "10", "--dtype", "float32", "--no-progress", "--seed", "3"]


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text(CORPUS * 60, encoding="utf-8")
    return path


@pytest.fixture
def noise(tmp_path):
    "A text with nothing to learn beyond its letters' frequencies: a model can only memorise it, so it overfits."
    rng, path = random.Random(0), tmp_path / "noise.txt"
    path.write_text("".join(rng.choice("abcdefgh \n") for _ in range(3000)), encoding="utf-8")
    return path


def train(data, out, *flags) -> int: return cli.main(["train", *TINY, "--data", str(data), "--out-dir", str(out), *map(str, flags)])


def weights(d): return load_checkpoint(d)[0].state_dict()


def test_ema_resume_equals_a_straight_run_and_the_checkpoint_holds_the_average(tmp_path, data):
    flags = ["--ema", "0.9", "--lr-decay-iters", "40"]
    assert train(data, tmp_path / "straight", "--max-iters", 40, *flags) == 0
    assert train(data, tmp_path / "split", "--max-iters", 20, *flags) == 0
    assert train(data, tmp_path / "split", "--max-iters", 40, "--resume", *flags) == 0
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    for name in a: torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    raw = load_trainer_state(tmp_path / "straight")["callbacks"]["EMA"]["raw"]
    assert set(raw) == set(a) and any(not torch.allclose(raw[k], a[k]) for k in a)  # average != raw weights
    full = [r["val_loss_full"] for r in read_metrics(tmp_path / "straight" / "metrics.jsonl") if "val_loss_full" in r]
    assert len(full) == 1 and full[0] < 4.0


def test_ema_zero_is_no_ema(tmp_path, data):
    assert train(data, tmp_path / "plain", "--max-iters", 20) == 0
    assert train(data, tmp_path / "zero", "--max-iters", 20, "--ema", "0") == 0
    a, b = weights(tmp_path / "plain"), weights(tmp_path / "zero")
    for name in a: assert torch.equal(a[name], b[name]), name


OVERFIT = ["--n-layer", "2", "--n-embd", "32", "--batch-size", "8", "--warmup-iters", "0", "--learning-rate", "1e-2"]


def test_holdout_is_scored_and_early_stopping_keeps_the_best(tmp_path, noise, capsys):
    out = tmp_path / "early"
    assert train(noise, out, "--max-iters", 150, *OVERFIT, "--holdout-frac", "0.2", "--early-stop") == 0
    records = read_metrics(out / "metrics.jsonl")
    held = [(r["step"], r["holdout_loss"]) for r in records if "holdout_loss" in r]
    assert [s for s, _ in held] == list(range(0, 151, 10))
    best = min(held, key=lambda h: h[1])[0]
    assert best < 150 and records[-1]["weights_step"] == best  # noise: the held-out loss is best before the end
    state = load_trainer_state(out)
    kept = state["callbacks"]["EarlyStop"]["weights"]
    for name, w in weights(out).items(): assert torch.equal(w, kept[name]), name
    assert state["config"]["holdout_frac"] == 0.2 and state["config"]["early_stop"] is True


def test_patience_stops_and_a_relaunch_says_complete(tmp_path, noise, capsys):
    out, data = tmp_path / "patient", noise
    flags = ["--max-iters", 400, *OVERFIT, "--holdout-frac", "0.2", "--early-stop", "--patience", "1"]
    assert train(data, out, *flags) == 0
    step = load_trainer_state(out)["step"]
    assert step < 400 and load_trainer_state(out)["callbacks"]["EarlyStop"]["stopped"]
    capsys.readouterr()
    assert train(data, out, *flags, "--auto-resume") == 0
    assert f"is complete: it stopped early at step {step}" in capsys.readouterr().out
    assert load_trainer_state(out)["step"] == step


def test_a_recipe_sets_them(tmp_path, data):
    recipe = tmp_path / "r.toml"
    recipe.write_text('ema = 0.5\nholdout_frac = 0.1\nearly_stop = true\npatience = 4\nmax_iters = 10\n')
    assert cli.main(["train", "--config", str(recipe), *TINY, "--data", str(data), "--out-dir", str(tmp_path / "o")]) == 0
    config = load_trainer_state(tmp_path / "o")["config"]
    assert (config["ema"], config["holdout_frac"], config["early_stop"], config["patience"]) == (0.5, 0.1, True, 4)


@pytest.mark.parametrize("flags, match", [(["--early-stop"], "pass both --early-stop and --holdout-frac"),
                                          (["--holdout-frac", "0.1", "--patience", "3"], "pass both --early-stop")])
def test_early_stopping_needs_a_holdout(tmp_path, data, capsys, flags, match):
    capsys.readouterr()
    assert train(data, tmp_path / "o", *flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags", [["--ema", "1"], ["--ema", "-0.1"], ["--holdout-frac", "0.5"], ["--patience", "-1"]])
def test_out_of_range_values_are_refused_by_the_parser(tmp_path, data, capsys, flags):
    with pytest.raises(SystemExit) as e: train(data, tmp_path / "o", *flags)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flags[0]}: must be" in err and "Traceback" not in err, err


def test_the_benchmark_collects_finished_runs(tmp_path, data):
    "benchmarks/smalldata.py: one line per finished run, named by its directory; unfinished runs are skipped."
    import shutil
    import subprocess
    import sys
    from pathlib import Path
    for name, flags in (("sr", []), ("sr-ema0.9", ["--ema", "0.9"])):
        assert train(data, tmp_path / "runs" / name / "seed-3", "--max-iters", 20, *flags) == 0
    unfinished = tmp_path / "runs" / "sr-cut" / "seed-3"
    shutil.copytree(tmp_path / "runs" / "sr" / "seed-3", unfinished)
    lines = (unfinished / "metrics.jsonl").read_text().splitlines()[:-1]  # no whole-split loss: not finished
    (unfinished / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "smalldata.jsonl"
    script = Path(__file__).parent.parent / "benchmarks" / "smalldata.py"
    r = subprocess.run([sys.executable, str(script), "--baseline", "sr", str(tmp_path / "runs" / "sr*" / "seed-*"),
                        "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "skipped" in r.stderr and "sr-cut" in r.stderr
    runs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(x["technique"], x["seed"], x["steps"]) for x in runs] == [("baseline", 3, 20), ("ema0.9", 3, 20)]
    metrics = read_metrics(tmp_path / "runs" / "sr" / "seed-3" / "metrics.jsonl")
    assert runs[0]["val_loss"] == round(metrics[-1]["val_loss_full"], 4)
    assert [c[2] for c in runs[0]["curve"]] == [m["train_loss"] for m in metrics if "val_loss" in m]
    assert runs[0]["epochs"] == round(runs[0]["tokens"] / runs[0]["train_split_tokens"], 3)
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "nothing*")], capture_output=True, text=True)
    assert r.returncode == 2 and "no finished run" in r.stderr


# --- chapter 13b's model option: a table of bigram logits ----------------------------------------------------------

def bigram_gpt(seed: int = 0, table: bool = True, **options):
    from nanogpt_plus.gpt import GPT, GPTConfig
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=11, context_size=32, n_layer=2, n_head=2, n_embd=16, bigram_table=table, **options)).eval()


def test_bigram_table_starts_as_no_change_and_adds_its_row(tmp_path):
    from nanogpt_plus.checkpoint import estimate_params, model_config
    from nanogpt_plus.speedrun import step_flops
    from nanogpt_plus.train import TrainConfig
    plain, with_table = bigram_gpt(table=False), bigram_gpt()
    idx = torch.randint(0, 11, (3, 20), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(with_table(idx)[0], plain(idx)[0], rtol=0, atol=0)  # zero at first: the same logits
    assert with_table.num_params() == plain.num_params() + 11 * 11 == estimate_params("gpt", model_config(with_table))
    assert with_table.flops_per_token(32) == plain.flops_per_token(32)  # a lookup: no matmul FLOPs
    train = TrainConfig(batch_size=4, context_size=32)
    assert step_flops(with_table.config, train) == step_flops(plain.config, train)
    with torch.no_grad(): with_table.bigram.weight.normal_(generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(with_table(idx)[0] - plain(idx)[0], with_table.bigram.weight[idx], rtol=1e-5, atol=1e-5)
    assert "bigram_table" not in repr(plain.config) and "bigram_table=True" in repr(with_table.config)


@pytest.mark.parametrize("options", [{}, dict(pos_emb="rope", norm="rmsnorm", logit_softcap=5.0)])
def test_bigram_table_decodes_alike_with_and_without_cache_and_when_served(options):
    from nanogpt_plus.serve import decode_rows, prefill
    model = bigram_gpt(**options)
    with torch.no_grad(): model.bigram.weight.normal_(std=3.0, generator=torch.Generator().manual_seed(3))  # it decides
    prompt = torch.tensor([[1, 2, 3, 4]])
    plain = model.generate(prompt, 20, temperature=0.0)
    cached = model.generate(prompt, 20, temperature=0.0, use_kv_cache=True)
    assert torch.equal(plain, cached)
    cache = model.new_kv_cache(1)
    first = prefill(model, prompt[0].tolist(), cache, 0)
    torch.testing.assert_close(first, model(prompt)[0][0, -1], rtol=1e-5, atol=1e-5)
    nxt = plain[0, 4:5]  # the token greedy decoding chose
    served = decode_rows(model, cache, nxt, torch.tensor([4]))
    torch.testing.assert_close(served[0], model(plain[:, :5])[0][0, -1], rtol=1e-5, atol=1e-5)


def test_bigram_table_exports_where_a_format_can_hold_it(tmp_path):
    from nanogpt_plus.formats import ExportError, export_onnx, gguf_architecture
    from nanogpt_plus.interop import hf_config
    model = bigram_gpt()
    with pytest.raises(ValueError, match="bigram_table=True has no exact counterpart"): hf_config(model.config)
    with pytest.raises(ExportError, match="bigram_table=True"): gguf_architecture(model.config)
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install nanogpt-plus[interop])")
    from nanogpt_plus.formats import OnnxDecoder
    with torch.no_grad(): model.bigram.weight.normal_(generator=torch.Generator().manual_seed(4))
    path = export_onnx(model, tmp_path / "m.onnx")
    ids = [1, 2, 3, 4, 5]
    theirs = OnnxDecoder(path, model.context_size)(ids)
    torch.testing.assert_close(torch.as_tensor(theirs), model(torch.tensor([ids]))[0][0], rtol=1e-4, atol=1e-4)


def test_train_with_a_bigram_table_and_old_configs_still_load(tmp_path, data, capsys):
    assert train(data, tmp_path / "b", "--max-iters", 10, "--bigram-table") == 0
    model, _ = load_checkpoint(tmp_path / "b")
    assert model.config.bigram_table and model.bigram.weight.abs().max() > 0  # it trained
    assert train(data, tmp_path / "plain", "--max-iters", 10) == 0
    meta = json.loads((tmp_path / "plain" / "config.json").read_text())
    del meta["config"]["bigram_table"]  # as every config.json before this option was written
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps(meta))
    for f in ("model.safetensors", "tokenizer.json"): (tmp_path / "old" / f).write_bytes((tmp_path / "plain" / f).read_bytes())
    old, new = load_checkpoint(tmp_path / "old")[0], load_checkpoint(tmp_path / "plain")[0]
    assert old.bigram is None and not old.config.bigram_table
    x = torch.randint(0, old.config.vocab_size, (2, 16))
    assert torch.equal(old(x)[0], new(x)[0])
    capsys.readouterr()
    assert cli.main(["train", "bigram", "--data", str(data), "--bigram-table", "--out-dir", str(tmp_path / "x")]) == 2
    assert "--bigram-table applies to `train gpt`" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["speedrun-5e13", "speedrun-1.5e14"])
def test_shipped_recipes_add_what_paid_and_turn_off_to_the_first_recipe(tmp_path, name):
    "Chapter 13's recipes carry chapter 13b's two settings and windows of 256; flags for the rest give earlier versions back."
    import tomllib
    from importlib.resources import files
    recipe = tomllib.loads(files("nanogpt_plus").joinpath("recipes", f"{name}.toml").read_text())
    batch = {"speedrun-5e13": 16, "speedrun-1.5e14": 8}[name]  # chapter 13's search: the larger budget wants more steps
    assert (recipe["ema"], recipe["bigram_table"], recipe["context_size"], recipe["batch_size"]) == (0.999, True, 256, batch)
    stored = [json.loads(line) for line in files("nanogpt_plus").joinpath("results", "speedrun.jsonl").read_text().splitlines()]
    shipped = [r["config"] for r in stored if r["recipe"] == name]
    assert len(shipped) == 3 and all({k: v for k, v in c.items() if k != "seed"} == recipe for c in shipped)  # runs of it
    # the seed varies by run; the first runs predate the `attention` setting (their trainer states record the explicit path)
    drop = lambda c: {k: v for k, v in c.items() if k not in ("seed", "attention")}
    short = ["--context-size", "64", "--batch-size", "32"]
    for version, flags in (("context 64", short), ("first", short + ["--ema", "0", "--no-bigram-table"])):
        earlier = [r["config"] for r in stored if r["recipe"] == f"{name} ({version})"]
        args = cli.parse_args(["train", "--config", name, *flags, "--out-dir", str(tmp_path)])
        cli.write_run_config(tmp_path / "run.toml", args)
        ran = tomllib.loads((tmp_path / "run.toml").read_text())
        assert earlier and all(drop(ran) == drop({"ema": 0.0, "bigram_table": False} | c) for c in earlier), version
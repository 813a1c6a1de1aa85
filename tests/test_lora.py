"""LoRA (chapter 14): adapters that change nothing until trained, merging, adapter files that know their base, training
that touches only the adapters, exact resumes from our checkpoints and from a tiny GPT-2, and the command line."""
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from nanogpt_plus import cli
from nanogpt_plus.checkpoint import CheckpointError, load_checkpoint, load_trainer_state, save_checkpoint
from nanogpt_plus.gpt import GPT, GPTConfig
from nanogpt_plus.lora import (AdapterCheckpoint, LoRALinear, adapter_state, add_lora, base_fingerprint,
                               describe_base, load_adapted, load_adapter, load_base, lora_layers, merge_lora,
                               read_adapter_config, save_adapter, strip_lora, unmerge_lora)
from nanogpt_plus.tokenizer import CharTokenizer
from nanogpt_plus.train import Checkpoint, TrainConfig, Trainer, standard_callbacks

CORPUS = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
ROMEO = "ROMEO:\nBut, soft! what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"
FAST = ["--batch-size", "4", "--context-size", "16", "--eval-iters", "2", "--eval-interval", "10", "--no-progress",
        "--device", "cpu", "--dtype", "float32"]


def tiny_gpt(seed=0, bias=True, **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**dict(vocab_size=40, context_size=16, n_layer=2, n_head=2, n_embd=16, bias=bias), **kw}))


def randomise_adapters(model, seed=1):
    "Trained-looking adapters: B is zero after add_lora, which would make every comparison below trivial."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model).values(): m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.2)
    return model


def logits(model, seed=3):
    idx = torch.randint(0, model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad(): return model.eval()(idx)[0]


def main(*argv):
    "In process: the exit status and stderr of `nanogpt-plus ARGV`."
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = cli.main([str(a) for a in argv])
    return status, err.getvalue()


# ---- the layer and add_lora ----

@pytest.mark.parametrize("targets", [("attn", "mlp"), ("qkv",), ("blocks.1.mlp.proj",), ("proj",)])
@pytest.mark.parametrize("bias", [True, False])
def test_a_fresh_adapter_changes_no_output(targets, bias):
    model = tiny_gpt(bias=bias)
    before = logits(model)
    add_lora(model, rank=4, alpha=8, targets=targets)
    assert lora_layers(model)
    assert torch.equal(logits(model), before)  # bit for bit: B = 0


def test_adapters_replace_exactly_the_targets_and_freeze_the_rest():
    model = add_lora(tiny_gpt(), rank=2, alpha=4, targets=["qkv", "mlp.fc"])
    assert sorted(lora_layers(model)) == ["blocks.0.attn.qkv", "blocks.0.mlp.fc", "blocks.1.attn.qkv", "blocks.1.mlp.fc"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{layer}.{ab}" for layer in lora_layers(model) for ab in ("lora_A", "lora_B")}
    assert all("lora" in n for n in trainable)
    qkv = model.blocks[0].attn.qkv
    assert isinstance(qkv, torch.nn.Linear) and qkv.lora_A.shape == (2, 16) and qkv.lora_B.shape == (48, 2)
    assert model.lm_head.weight is model.tok_emb.weight  # the tie survives


def test_names_of_the_base_weights_do_not_change():
    plain = set(dict(tiny_gpt().named_parameters()))
    adapted = set(dict(add_lora(tiny_gpt(), 2, 4).named_parameters()))
    assert plain <= adapted and all("lora" in n for n in adapted - plain)


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=0, alpha=1), "rank must be a positive integer"),
    (dict(rank=-2, alpha=1), "rank must be a positive integer"),
    (dict(rank=2.5, alpha=1), "rank must be a positive integer"),
    (dict(rank=2, alpha=-1), "alpha must be a finite number > 0"),
    (dict(rank=2, alpha=0), "alpha must be a finite number > 0"),
    (dict(rank=2, alpha=float("nan")), "alpha must be a finite number > 0"),
    (dict(rank=2, alpha=1, dropout=1.0), "dropout must be in [0, 1)"),
    (dict(rank=2, alpha=1, targets=["attention"]), "names no linear layer"),
    (dict(rank=2, alpha=1, targets=["blocks.7"]), "names no linear layer"),
    (dict(rank=2, alpha=1, targets=[]), "no LoRA targets"),
    (dict(rank=2, alpha=1, targets=["lm_head"]), "shares its weight"),
    (dict(rank=17, alpha=1), "exceeds the smaller side"),
])
def test_bad_settings_are_refused_before_anything_changes(kwargs, match):
    model = tiny_gpt()
    with pytest.raises(ValueError, match=match.replace("[", r"\[").replace(")", r"\)").replace("(", r"\(")):
        add_lora(model, **kwargs)
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())


def test_adding_twice_is_refused():
    model = add_lora(tiny_gpt(), 2, 4)
    with pytest.raises(ValueError, match="already"): add_lora(model, 2, 4)


# ---- merging ----

def test_merged_and_unmerged_agree():
    model = randomise_adapters(add_lora(tiny_gpt(), 4, 8))
    base = logits(tiny_gpt())
    adapted = logits(model)
    assert (adapted - base).abs().max() > 1e-2  # the adapters do something
    merge_lora(model)
    assert all(m.merged for m in lora_layers(model).values())
    torch.testing.assert_close(logits(model), adapted, rtol=0, atol=1e-5)
    unmerge_lora(model)
    torch.testing.assert_close(logits(model), adapted, rtol=0, atol=1e-5)
    plain = strip_lora(model, merge=True)
    assert not lora_layers(plain) and all(type(m) is not LoRALinear for m in plain.modules())
    torch.testing.assert_close(logits(plain), adapted, rtol=0, atol=1e-5)
    assert all(p.requires_grad for p in plain.parameters())


def test_strip_without_merging_gives_the_base_back():
    model = randomise_adapters(add_lora(tiny_gpt(), 4, 8))
    assert torch.equal(logits(strip_lora(model, merge=False)), logits(tiny_gpt()))


def test_merged_model_saves_as_an_ordinary_checkpoint(tmp_path):
    model = randomise_adapters(add_lora(tiny_gpt(), 4, 8))
    adapted = logits(model)
    save_checkpoint(tmp_path, strip_lora(model), CharTokenizer("".join(chr(65 + i) for i in range(40))))
    loaded, _ = load_checkpoint(tmp_path)
    assert not any("lora" in k for k in load_file(tmp_path / "model.safetensors"))
    torch.testing.assert_close(logits(loaded), adapted, rtol=0, atol=1e-5)


def test_fingerprint_refuses_merged_weights():
    model = merge_lora(randomise_adapters(add_lora(tiny_gpt(), 4, 8)))
    with pytest.raises(ValueError, match="merged"): base_fingerprint(model)
    unmerge_lora(model)  # equal to the base only up to rounding: still refused
    with pytest.raises(ValueError, match="rounding"): base_fingerprint(model)


# ---- training ----

def test_a_training_step_changes_only_the_adapters(tmp_path):
    model = add_lora(tiny_gpt(dropout=0.1), 4, 8, dropout=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = torch.randint(0, 40, (2000,))
    cfg = TrainConfig(max_iters=2, batch_size=4, context_size=16, warmup_iters=0, dtype="float32")
    t = Trainer(model, data[:1800], data[1800:], cfg, "cpu")
    t.train_step()
    t.train_step()  # the first step moves only B (A's gradient is B^T g = 0); the second moves A too
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n in before if "lora_" in n}
    with_state = {id(p) for p in t.optimizer.state}
    assert with_state == {id(p) for n, p in model.named_parameters() if "lora_" in n}


def test_the_first_step_moves_b_only():
    model = add_lora(tiny_gpt(), 4, 8)
    x = torch.randint(0, 40, (2, 16))
    model(x, x)[1].backward()
    for m in lora_layers(model).values():
        assert m.lora_A.grad.abs().max() == 0 and m.lora_B.grad.abs().max() > 0


def test_adapter_checkpoints_in_a_trainer_run(tmp_path):
    model = tiny_gpt()
    base = describe_base(model, "somewhere")
    add_lora(model, 2, 4)
    data = torch.randint(0, 40, (2000,))
    cfg = TrainConfig(max_iters=10, batch_size=4, context_size=16, eval_interval=5, eval_iters=1, dtype="float32")
    tok = CharTokenizer("".join(chr(65 + i) for i in range(40)))
    callbacks = [AdapterCheckpoint(tmp_path, tok, base) if type(cb) is Checkpoint else cb
                 for cb in standard_callbacks(cfg, tmp_path, tok, progress=False)]
    Trainer(model, data[:1800], data[1800:], cfg, "cpu", callbacks).fit()
    assert not (tmp_path / "model.safetensors").exists() and (tmp_path / "adapter.safetensors").exists()
    assert read_adapter_config(tmp_path)["base"] == base and (tmp_path / "best" / "adapter.json").exists()
    assert load_trainer_state(tmp_path)["step"] == 10


# ---- adapter files ----

def test_saved_and_loaded_adapter_gives_the_same_outputs(tmp_path):
    model = randomise_adapters(add_lora(tiny_gpt(), 4, 8, dropout=0.1))
    save_adapter(tmp_path, model)
    assert {p.name for p in tmp_path.iterdir()} == {"adapter.json", "adapter.safetensors", "checkpoint.json"}
    assert set(load_file(tmp_path / "adapter.safetensors")) == set(adapter_state(model))
    meta = json.loads((tmp_path / "adapter.json").read_text())
    assert (meta["rank"], meta["alpha"], meta["dropout"]) == (4, 8, 0.1)
    assert meta["base"]["sha256"] == base_fingerprint(tiny_gpt())
    loaded = load_adapter(tmp_path, tiny_gpt())
    assert torch.equal(logits(loaded), logits(model))


def test_an_adapter_on_the_wrong_base_is_refused(tmp_path):
    save_adapter(tmp_path, randomise_adapters(add_lora(tiny_gpt(seed=0), 4, 8)))
    for other in (tiny_gpt(seed=1), tiny_gpt(seed=0, n_embd=32)):
        with pytest.raises(CheckpointError, match="belongs to another base model"): load_adapter(tmp_path, other)
        assert not lora_layers(other)


def test_damaged_adapter_files(tmp_path):
    save_adapter(tmp_path / "a", randomise_adapters(add_lora(tiny_gpt(), 4, 8)))
    path = tmp_path / "a" / "adapter.safetensors"
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(CheckpointError, match="adapter.safetensors does not match the checksum"):
        load_adapter(tmp_path / "a", tiny_gpt())
    with pytest.raises(FileNotFoundError, match="does not exist"): read_adapter_config(tmp_path / "none")
    (tmp_path / "b").mkdir()
    with pytest.raises(CheckpointError, match="holds no LoRA adapter"): read_adapter_config(tmp_path / "b")
    with pytest.raises(ValueError, match="no LoRA adapters to save"): save_adapter(tmp_path / "c", tiny_gpt())


def test_adapter_files_are_small(tmp_path):
    "GPT-2 124M's shape on the meta device: the adapters of rank 8 are about 1% of the weights."
    with torch.device("meta"): model = GPT(GPTConfig.from_name("gpt2"))
    add_lora(model, 8, 16)
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n_lora == 12 * 8 * ((768 + 3 * 768) + (768 + 768) + (768 + 4 * 768) + (4 * 768 + 768))
    assert n_lora / sum(p.numel() for p in model.parameters()) < 0.01


# ---- the command line ----

@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("texts")
    (d / "rest.txt").write_text(CORPUS * 60 + ROMEO, encoding="utf-8")  # every character of the fine-tuning text
    (d / "romeo.txt").write_text(ROMEO * 40, encoding="utf-8")
    (d / "japanese.txt").write_text("ロミオとジュリエット\n" * 100, encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def base_dir(texts):
    out = texts / "base"
    status, err = main("train", "gpt", "--data", texts / "rest.txt", "--n-layer", 2, "--n-head", 2, "--n-embd", 16,
                       "--max-iters", 10, "--out-dir", out, "--seed", 1, *FAST)
    assert status == 0, err
    return out


def lora_run(texts, base, out, *extra):
    return main("train", "gpt", "--init-from", base, "--use-lora", "--lora-rank", 2, "--lora-alpha", 4,
                "--lora-dropout", 0.1, "--data", texts / "romeo.txt", "--lr-decay-iters", 40, "--seed", 5,
                "--out-dir", out, *FAST, *extra)


def test_lora_resume_20_plus_20_equals_40(tmp_path, texts, base_dir):
    assert lora_run(texts, base_dir, tmp_path / "straight", "--max-iters", 40)[0] == 0
    assert lora_run(texts, base_dir, tmp_path / "split", "--max-iters", 20)[0] == 0
    status, err = main("train", "--config", tmp_path / "split" / "run.toml", "--out-dir", tmp_path / "split",
                       "--max-iters", 40, "--resume")  # the settings it ran with
    assert status == 0, err
    a, b = (load_file(tmp_path / d / "adapter.safetensors") for d in ("straight", "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert load_trainer_state(tmp_path / "split")["step"] == 40
    assert not (tmp_path / "split" / "model.safetensors").exists()
    assert (tmp_path / "split" / "adapter.safetensors").stat().st_size < 20_000  # kilobytes, not the model


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_a_resumable_adapter(tmp_path, texts, base_dir, sig, status):
    "Ctrl-C or SIGTERM in a real process: the run stops at a step boundary with a resumable adapter checkpoint."
    out = tmp_path / "lora"
    argv = ["train", "gpt", "--init-from", base_dir, "--use-lora", "--data", texts / "romeo.txt", "--max-iters", 1_000_000,
            "--out-dir", out, *FAST]
    p = subprocess.Popen([sys.executable, "-m", "nanogpt_plus", *map(str, argv)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    metrics, deadline = out / "metrics.jsonl", time.time() + 120
    while time.time() < deadline and not (metrics.exists() and '"loss"' in metrics.read_text()):
        time.sleep(0.2)  # wait until it is really training
    p.send_signal(sig)
    _, stderr = p.communicate(timeout=120)
    assert p.returncode == status and "Traceback" not in stderr and "--resume" in stderr, stderr
    step = load_trainer_state(out)["step"]
    assert step >= 10 and not (out / "model.safetensors").exists()
    status, err = main("train", "gpt", "--data", texts / "romeo.txt", "--max-iters", step + 5, "--out-dir", out,
                       "--resume", *FAST)
    assert status == 0, err
    assert load_trainer_state(out)["step"] == step + 5


def test_generate_from_an_adapter_equals_generate_from_the_merged_model(tmp_path, texts, base_dir, capsys):
    assert lora_run(texts, base_dir, tmp_path / "lora", "--max-iters", 20)[0] == 0
    assert main("merge", tmp_path / "lora", "--out-dir", tmp_path / "merged")[0] == 0
    samples = []
    for how in (["--checkpoint", tmp_path / "lora"], ["--adapter", tmp_path / "lora", "--checkpoint", base_dir],
                ["--checkpoint", tmp_path / "merged"]):
        capsys.readouterr()
        assert cli.main(["generate", "gpt", *map(str, how), "--max-new-tokens", "30", "--seed", "3",
                         "--continue-tokens", "ROMEO:"]) == 0
        samples.append(capsys.readouterr().out)
    assert samples[0] == samples[1] == samples[2] and len(samples[0]) > 30
    model, _ = load_adapted(tmp_path / "lora")
    merged, _ = load_checkpoint(tmp_path / "merged")
    torch.testing.assert_close(logits(merge_lora(model)), logits(merged), rtol=0, atol=1e-5)


def test_full_fine_tune_trains_every_weight(tmp_path, texts, base_dir):
    status, err = main("train", "gpt", "--init-from", base_dir, "--data", texts / "romeo.txt", "--max-iters", 10,
                       "--out-dir", tmp_path / "full", *FAST)
    assert status == 0, err
    base, _ = load_checkpoint(base_dir)
    tuned, _ = load_checkpoint(tmp_path / "full")
    assert all(not torch.equal(p, q) for (_, p), (_, q) in zip(base.named_parameters(), tuned.named_parameters()))
    assert len(load_trainer_state(tmp_path / "full")["optimizer"]["state"]) == len(list(base.parameters()))


def test_cli_errors(tmp_path, texts, base_dir):
    assert lora_run(texts, base_dir, tmp_path / "lora", "--max-iters", 10)[0] == 0
    other = tmp_path / "other"
    assert main("train", "gpt", "--data", texts / "rest.txt", "--n-layer", 2, "--n-head", 2, "--n-embd", 16,
                "--max-iters", 5, "--out-dir", other, "--seed", 2, *FAST)[0] == 0
    cases = [
        (["generate", "gpt", "--adapter", tmp_path / "lora", "--checkpoint", other], "belongs to another base model"),
        (["merge", tmp_path / "lora", "--out-dir", tmp_path / "m", "--base", other], "belongs to another base model"),
        (["train", "gpt", "--out-dir", tmp_path / "lora", "--resume", "--max-iters", 20, "--init-from", other, "--data",
          texts / "romeo.txt", *FAST],
         "belongs to another base model"),
        (["train", "gpt", "--use-lora", "--data", texts / "romeo.txt", "--out-dir", tmp_path / "x"], "--init-from"),
        (["train", "gpt", "--init-from", base_dir, "--lora-rank", 4, "--out-dir", tmp_path / "x"], "add --use-lora"),
        (["train", "gpt", "--init-from", base_dir, "--size", "small", "--out-dir", tmp_path / "x"], "--size describes"),
        (["train", "bigram", "--init-from", base_dir, "--out-dir", tmp_path / "x"], "use `train gpt`"),
        (["train", "gpt", "--init-from", tmp_path / "lora", "--out-dir", tmp_path / "x"], "holds a LoRA adapter"),
        (["train", "gpt", "--init-from", tmp_path / "nothing", "--out-dir", tmp_path / "x"], "neither a directory"),
        (["train", "gpt", "--init-from", base_dir, "--use-lora", "--lora-targets", "attention", "--data",
          texts / "romeo.txt", "--out-dir", tmp_path / "x", *FAST], "names no linear layer"),
        (["train", "gpt", "--init-from", base_dir, "--use-lora", "--lora-rank", 64, "--data", texts / "romeo.txt",
          "--out-dir", tmp_path / "x", *FAST], "exceeds the smaller side"),
        (["train", "gpt", "--init-from", base_dir, "--data", texts / "japanese.txt", "--out-dir", tmp_path / "x", *FAST],
         "the data do not fit the checkpoint's tokenizer"),
        (["merge", tmp_path / "lora", "--out-dir", tmp_path / "lora"], "holds a LoRA adapter"),
    ]
    for argv, match in cases:
        status, err = main(*argv)
        assert status == 2 and err.startswith("error: ") and match in err and "Traceback" not in err, (argv, err)
    for argv in (["--lora-rank", "0"], ["--lora-alpha", "-1"], ["--lora-dropout", "1"]):
        with pytest.raises(SystemExit) as e:
            with contextlib.redirect_stderr(io.StringIO()): cli.main(["train", "gpt", "--init-from", str(base_dir), "--use-lora", *argv])
        assert e.value.code == 2


def test_a_moved_base_can_be_named_again(tmp_path, texts, base_dir):
    import shutil
    base = shutil.copytree(base_dir, tmp_path / "base")
    assert lora_run(texts, base, tmp_path / "lora", "--max-iters", 10)[0] == 0
    moved = base.rename(tmp_path / "moved")
    status, err = main("generate", "gpt", "--checkpoint", tmp_path / "lora", "--max-new-tokens", 5)
    assert status == 2 and "if it moved, pass its new place" in err
    assert main("generate", "gpt", "--adapter", tmp_path / "lora", "--checkpoint", moved, "--max-new-tokens", 5)[0] == 0
    status, err = main("train", "gpt", "--out-dir", tmp_path / "lora", "--resume", "--max-iters", 20, "--init-from", moved,
                       "--data", texts / "romeo.txt", *FAST)
    assert status == 0, err
    assert read_adapter_config(tmp_path / "lora")["base"]["source"] == str(moved.resolve())  # found next time


# ---- GPT-2 ----

@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    d = tmp_path_factory.mktemp("tiny_gpt2")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, initializer_range=0.2)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(d)
    return d


def test_lora_from_a_saved_gpt2_resumes_exactly(tmp_path, texts, tiny_gpt2):
    common = ["train", "gpt", "--init-from", tiny_gpt2, "--use-lora", "--lora-rank", 4, "--lora-targets", "qkv,proj",
              "--lora-dropout", 0.1, "--data", texts / "romeo.txt", "--lr-decay-iters", 40, *FAST]
    assert main(*common, "--max-iters", 40, "--out-dir", tmp_path / "straight")[0] == 0
    assert main(*common, "--max-iters", 20, "--out-dir", tmp_path / "split")[0] == 0
    status, err = main("train", "gpt", "--data", texts / "romeo.txt", "--out-dir", tmp_path / "split", "--max-iters", 40,
                       "--resume", *FAST)
    assert status == 0, err
    a, b = (load_file(tmp_path / d / "adapter.safetensors") for d in ("straight", "split"))
    assert all(torch.equal(a[k], b[k]) for k in a) and len(a) == 2 * 2 * 3  # qkv, attn.proj, mlp.proj; A and B
    meta = read_adapter_config(tmp_path / "split")
    assert meta["base"]["source"] == str(tiny_gpt2.resolve()) and meta["base"]["config"]["vocab_size"] == 50257
    model, tok = load_adapted(tmp_path / "split")
    assert tok.kind == "gpt2" and lora_layers(model)
    _, _, identity = load_base(tiny_gpt2)
    assert identity["sha256"] == meta["base"]["sha256"]

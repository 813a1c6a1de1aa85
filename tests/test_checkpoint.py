"Checkpoint directories: round trips, all-or-nothing commits, one writer, clear errors for damaged or foreign files."
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from nanogpt_plus import checkpoint as ck
from nanogpt_plus.bigram import BigramLanguageModel
from nanogpt_plus.gpt import GPT, GPTConfig
from nanogpt_plus.tokenizer import CharTokenizer

CORPUS = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
TINY = dict(context_size=16, n_layer=2, n_head=2, n_embd=16)


@pytest.fixture
def tok():
    return CharTokenizer(CORPUS)


def tiny_gpt(vocab_size, **kw):
    return GPT(GPTConfig(vocab_size=vocab_size, **(TINY | kw)))


def state(step=3):
    return {"step": step, "optimizer": {"state": {}, "param_groups": []}, "scaler": {}, "batch_rng": torch.Generator().get_state(),
            "torch_rng": torch.get_rng_state(), "cuda_rng": [], "tokens_seen": 96, "train_time": 0.5,
            "config": {"max_iters": 10}, "data_tokens": 1000}


def test_bigram_round_trip(tmp_path, tok):
    torch.manual_seed(0)
    model = BigramLanguageModel(tok.vocab_size)
    d = ck.save_checkpoint(tmp_path / "ck", model, tok)
    assert sorted(p.name for p in d.iterdir()) == ["checkpoint.json", "config.json", "model.safetensors", "tokenizer.json"]
    assert json.loads((d / "config.json").read_text()) == {"model": "bigram", "config": {"vocab_size": tok.vocab_size}}
    loaded, tok2 = ck.load_checkpoint(d)
    assert isinstance(loaded, BigramLanguageModel)
    assert torch.equal(loaded.logits_table.weight, model.logits_table.weight)
    assert tok2.encode(CORPUS) == tok.encode(CORPUS) and tok2.decode(tok.encode("hear me")) == "hear me"


def test_gpt_round_trip_keeps_tied_weights(tmp_path, tok):
    torch.manual_seed(0)
    model = tiny_gpt(tok.vocab_size)
    d = ck.save_checkpoint(tmp_path / "ck", model, tok, trainer_state=state())
    loaded, _ = ck.load_checkpoint(d, device="cpu", kind="gpt")
    assert loaded.config == model.config
    assert loaded.lm_head.weight is loaded.tok_emb.weight  # still one tensor
    x = torch.tensor([tok.encode("hear me speak")])
    torch.testing.assert_close(loaded(x)[0], model(x)[0], rtol=0, atol=0)
    assert ck.load_trainer_state(d)["step"] == 3 and ck.read_checkpoint_config(d)["step"] == 3


def test_old_checkpoints_without_a_manifest_still_load(tmp_path, tok):
    d = ck.save_checkpoint(tmp_path / "ck", tiny_gpt(tok.vocab_size), tok, trainer_state=state())
    (d / "checkpoint.json").unlink()
    assert ck.load_checkpoint(d)[0].config.n_layer == 2 and ck.load_trainer_state(d)["step"] == 3


def test_a_failed_save_keeps_the_old_checkpoint(tmp_path, tok, monkeypatch):
    d = ck.save_checkpoint(tmp_path / "ck", BigramLanguageModel(tok.vocab_size), tok, trainer_state=state(1))
    before = {p.name: p.read_bytes() for p in d.iterdir()}

    def crash(model, path, metadata=None):  # the disk fills up half-way through the weights
        Path(path).write_bytes(b"half a fi")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(ck, "save_model", crash)
    with pytest.raises(ck.CheckpointWriteError, match=r"could not write .*model.safetensors \(No space left on device\); "
                                                       r"the previous checkpoint \(step 1\) is intact"):
        ck.save_checkpoint(d, BigramLanguageModel(tok.vocab_size), tok, trainer_state=state(2))
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before  # not a byte changed, no temporary left


CRASH = textwrap.dedent("""
    import os, sys, torch
    from nanogpt_plus import checkpoint as ck
    from nanogpt_plus.bigram import BigramLanguageModel
    from nanogpt_plus.tokenizer import CharTokenizer
    k, calls, real = int(sys.argv[2]), [0], os.replace
    def replace(src, dst):
        calls[0] += 1
        if calls[0] == k: os._exit(9)  # the process dies here, as under kill -9: no cleanup runs
        real(src, dst)
    os.replace = replace
    tok = CharTokenizer("abcdefgh")
    torch.manual_seed(2)
    state = {{"step": 2, "optimizer": {{"state": {{}}, "param_groups": []}}, "scaler": {{}}, "batch_rng": torch.Generator().get_state(),
             "torch_rng": torch.get_rng_state(), "cuda_rng": [], "tokens_seen": 2, "train_time": 0.5,
             "config": {{}}, "data_tokens": 100}}
    ck.save_checkpoint(sys.argv[1], BigramLanguageModel(tok.vocab_size), tok, trainer_state=state)
""")


def test_a_commit_killed_at_any_rename_leaves_one_whole_checkpoint(tmp_path):
    "Kill the process at each os.replace of a save; afterwards the directory holds step 1 or step 2, whole."
    tok = CharTokenizer("abcdefgh")
    outcomes = set()
    for k in range(1, 9):
        d = tmp_path / f"k{k}"
        torch.manual_seed(1)
        m1 = BigramLanguageModel(tok.vocab_size)
        ck.save_checkpoint(d, m1, tok, trainer_state=state(1))
        r = subprocess.run([sys.executable, "-c", CRASH.format(), str(d), str(k)], capture_output=True, text=True)
        assert r.returncode in (0, 9), r.stderr
        model, _ = ck.load_checkpoint(d)  # recovers first: finishes a commit that passed its commit point
        step = ck.load_trainer_state(d)["step"]
        torch.manual_seed(step)
        expected = BigramLanguageModel(tok.vocab_size)
        assert torch.equal(model.logits_table.weight, expected.logits_table.weight), k  # weights of that very step
        with ck.RunLock(d): ck.recover(d)  # what the next trainer does first: debris of a commit that never was goes
        assert not [p.name for p in d.iterdir() if p.name.endswith((".new", ".tmp", ".pending"))]
        outcomes.add(step)
    assert outcomes == {1, 2}  # some crashes came before the commit point, some after


def test_damaged_and_foreign_files_are_refused_with_the_file_named(tmp_path, tok):
    good = ck.save_checkpoint(tmp_path / "good", tiny_gpt(tok.vocab_size), tok, trainer_state=state())
    cfg = json.loads((good / "config.json").read_text())

    def damaged(name, content, manifest=False):
        d = tmp_path / "d"
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(good, d)
        if not manifest: (d / "checkpoint.json").unlink()
        (d / name).write_bytes(content.encode() if isinstance(content, str) else content)
        return d

    cases = [
        ("model.safetensors", b"\0" * 64, True, "does not match the checksum"),
        ("config.json", "{not json", False, "config.json is not a valid model configuration"),
        ("config.json", "[1, 2]", False, "does not describe a model"),
        ("config.json", json.dumps(cfg | {"config": cfg["config"] | {"extra": 1}}), False, "unknown field(s) extra"),
        ("config.json", json.dumps(cfg | {"config": {k: v for k, v in cfg["config"].items() if k != "n_head"}}), False,
         "missing field(s) n_head"),
        ("config.json", json.dumps(cfg | {"config": cfg["config"] | {"n_layer": "2"}}), False, "n_layer must be a positive integer"),
        ("tokenizer.json", '{"type": "char", "chars": 123}', False, "tokenizer.json is not a valid tokenizer"),
        ("tokenizer.json", '{"type": "char"}', False, "tokenizer.json is not a valid tokenizer"),
        ("tokenizer.json", '[1, 2]', False, "tokenizer.json is not a valid tokenizer"),
        ("tokenizer.json", '{"type": "char", "chars": "ab"}', False, "has 2 tokens but the model has"),
        ("model.safetensors", b"\0" * 64, False, "cannot load the weights"),
    ]
    for name, content, manifest, message in cases:
        with pytest.raises(ck.CheckpointError) as e: ck.load_checkpoint(damaged(name, content, manifest))
        assert message in str(e.value), (name, str(e.value))

    class Payload:
        def __reduce__(self): return (os.system, ("echo pwned",))
    for content in (b"", b"PK\x03\x04 cut", pickle.dumps(Payload()), pickle.dumps({"step": 3}), pickle.dumps([1])):
        with pytest.raises(ck.CheckpointError, match="cannot be resumed") as e:
            ck.load_trainer_state(damaged("trainer_state.pt", content))
        assert "weights_only" not in str(e.value)


def test_absurd_sizes_are_refused_before_anything_is_allocated(tmp_path, tok):
    d = ck.save_checkpoint(tmp_path / "ck", tiny_gpt(tok.vocab_size), tok)
    (d / "checkpoint.json").unlink()
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg | {"config": cfg["config"] | {"n_layer": 1_000_000, "n_embd": 4096, "n_head": 32}}))
    with pytest.raises(MemoryError, match="needs at least"): ck.load_checkpoint(d)
    assert ck.estimate_params("gpt", GPTConfig(vocab_size=50257, context_size=1024, n_layer=12, n_head=12,
                                               n_embd=768)) == 124_439_808  # GPT-2 124M, tied head counted once


def test_estimate_matches_the_model():
    for bias in (True, False):
        config = GPTConfig(vocab_size=65, bias=bias, **TINY)
        assert ck.estimate_params("gpt", config) == GPT(config).num_params()


LOCK = "from nanogpt_plus.checkpoint import RunLock\nimport sys\nwith RunLock(sys.argv[1]): print('locked')"


def test_one_writer_per_directory(tmp_path):
    with ck.RunLock(tmp_path):
        with ck.RunLock(tmp_path): pass  # the same process may take it again
        r = subprocess.run([sys.executable, "-c", LOCK, str(tmp_path)], capture_output=True, text=True)
        assert r.returncode != 0 and f"is in use by a running trainer (pid {os.getpid()}" in r.stderr
    r = subprocess.run([sys.executable, "-c", LOCK, str(tmp_path)], capture_output=True, text=True)
    assert r.stdout.strip() == "locked"  # released when the holder let go
    holder = subprocess.Popen([sys.executable, "-c", LOCK + "\nimport time; time.sleep(60)", str(tmp_path)], stdout=subprocess.PIPE)
    assert holder.stdout.readline().strip() == b"locked"
    holder.kill()  # a process that dies holding the lock: the kernel releases it
    holder.wait()
    with ck.RunLock(tmp_path): pass


def test_load_errors(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="does not exist"): ck.load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is not a checkpoint"): ck.load_checkpoint(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError): ck.load_checkpoint(tmp_path / "file")
    d = ck.save_checkpoint(tmp_path / "bigram", BigramLanguageModel(tok.vocab_size), tok)
    with pytest.raises(ValueError, match="holds a bigram model, not a gpt model"): ck.load_checkpoint(d, kind="gpt")
    with pytest.raises(ValueError, match="cannot be resumed"): ck.load_trainer_state(d)

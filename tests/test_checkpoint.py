"Checkpoint directories: round trips, atomic writes, no pickle, and clear errors for bad directories."
import json
from pathlib import Path

import pytest
import torch

from nanogpt_plus import train
from nanogpt_plus.bigram import BigramLanguageModel
from nanogpt_plus.tokenizer import CharTokenizer

CORPUS = "First Citizen:\nBefore we proceed any further, hear me speak.\n"


@pytest.fixture
def tok():
    return CharTokenizer(CORPUS)


def tiny_gpt(vocab_size, **kw):
    from nanogpt_plus import gpt
    cfg = dict(vocab_size=vocab_size, context_size=16, n_layer=2, n_head=2, n_embd=16) | kw
    return gpt.GPT(gpt.GPTConfig(**cfg))


def test_bigram_round_trip(tmp_path, tok):
    torch.manual_seed(0)
    model = BigramLanguageModel(tok.vocab_size)
    d = train.save_checkpoint(tmp_path / "ck", model, tok)
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert json.loads((d / "config.json").read_text()) == {"model": "bigram", "config": {"vocab_size": tok.vocab_size}}
    loaded, tok2 = train.load_checkpoint(d)
    assert isinstance(loaded, BigramLanguageModel)
    assert torch.equal(loaded.logits_table.weight, model.logits_table.weight)
    assert tok2.encode(CORPUS) == tok.encode(CORPUS) and tok2.decode(tok.encode("hear me")) == "hear me"


def test_gpt_round_trip_keeps_tied_weights(tmp_path, tok):
    torch.manual_seed(0)
    model = tiny_gpt(tok.vocab_size)
    d = train.save_checkpoint(tmp_path / "ck", model, tok)
    loaded, _ = train.load_checkpoint(d, device="cpu", kind="gpt")
    assert loaded.config == model.config
    assert loaded.lm_head.weight is loaded.tok_emb.weight  # still one tensor
    x = torch.tensor([tok.encode("hear me speak")])
    torch.testing.assert_close(loaded(x)[0], model(x)[0], rtol=0, atol=0)


def test_trainer_state_is_pickle_free(tmp_path, tok):
    "trainer_state.pt loads with weights_only=True: tensors, numbers and strings only."
    model = BigramLanguageModel(tok.vocab_size)
    data = torch.tensor(tok.encode(CORPUS * 20))
    t = train.Trainer(model, data[:900], data[900:], train.TrainConfig(max_iters=3, context_size=8, batch_size=4,
                      eval_iters=1), tok, out_dir=tmp_path / "ck", progress=False).fit()
    state = torch.load(tmp_path / "ck" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 3 and isinstance(state["batch_rng"], torch.Tensor)
    assert state["config"]["max_iters"] == 3
    assert t.step == 3 and train.load_trainer_state(tmp_path / "ck")["step"] == 3


def test_a_failed_save_keeps_the_old_checkpoint(tmp_path, tok, monkeypatch):
    d = train.save_checkpoint(tmp_path / "ck", BigramLanguageModel(tok.vocab_size), tok)
    before = (d / "model.safetensors").read_bytes()

    def crash(model, path, metadata=None):  # the disk fills up half-way through the weights
        Path(path).write_bytes(b"half a fi")
        raise OSError("disk full")
    monkeypatch.setattr(train, "save_model", crash)
    with pytest.raises(OSError, match="disk full"):
        train.save_checkpoint(d, BigramLanguageModel(tok.vocab_size), tok)
    assert (d / "model.safetensors").read_bytes() == before
    assert not [p for p in d.iterdir() if p.name.endswith(".tmp")]  # no temporary left behind


def test_load_errors(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train.load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is not a checkpoint"):
        train.load_checkpoint(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        train.load_checkpoint(tmp_path / "file")
    d = train.save_checkpoint(tmp_path / "bigram", BigramLanguageModel(tok.vocab_size), tok)
    with pytest.raises(ValueError, match="holds a bigram model, not a gpt model"):
        train.load_checkpoint(d, kind="gpt")
    with pytest.raises(ValueError, match="cannot be resumed"):
        train.load_trainer_state(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        train.load_checkpoint(d)
    (d / "config.json").write_text(json.dumps({"model": "lstm", "config": {}}))
    with pytest.raises(ValueError, match="bigram or gpt"):
        train.load_checkpoint(d)
    (d / "config.json").write_text(json.dumps({"model": "bigram", "config": {"vocab_size": 7}}))
    with pytest.raises(ValueError, match="cannot load the weights"):  # weights of another shape
        train.load_checkpoint(d)

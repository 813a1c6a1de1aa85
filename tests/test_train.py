"The training loop: accumulation, learning-rate timing, evaluation, exact resume, Ctrl-C, metrics."
import math
import os
import signal

import pytest
import torch

from nanogpt_plus import train
from nanogpt_plus.bigram import BigramLanguageModel
from nanogpt_plus.optim import lr_at
from nanogpt_plus.tokenizer import CharTokenizer

CORPUS = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
TOK = CharTokenizer(CORPUS)
DATA = torch.tensor(TOK.encode(CORPUS * 40))
TRAIN, VAL = DATA[:int(0.9 * len(DATA))], DATA[int(0.9 * len(DATA)):]


def tiny_gpt(seed=0, dropout=0.1):
    from nanogpt_plus import gpt
    torch.manual_seed(seed)
    return gpt.GPT(gpt.GPTConfig(vocab_size=TOK.vocab_size, context_size=16, n_layer=2, n_head=2, n_embd=16,
                                 dropout=dropout))


def cfg(**kw):
    base = dict(max_iters=40, batch_size=4, context_size=16, learning_rate=3e-3, warmup_iters=5, eval_interval=10,
                eval_iters=2, log_interval=5, dtype="float32")
    return train.TrainConfig(**(base | kw))


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", ["bigram", "gpt"])
def test_accumulation_equals_the_big_batch(kind):
    "One step on a batch of 8 == one step on 2 micro-batches of 4 (same windows), clipping included."
    results = []
    for batch_size, k in ((8, 1), (4, 2)):
        if kind == "gpt": model = tiny_gpt(dropout=0.0)
        else:
            torch.manual_seed(0)
            model = BigramLanguageModel(TOK.vocab_size)
        t = train.Trainer(model, TRAIN, VAL, cfg(batch_size=batch_size, grad_accum_steps=k, grad_clip=0.01),
                          progress=False)
        loss = t.train_step()
        results.append((loss, params(model)))
    (loss1, p1), (loss2, p2) = results
    assert math.isclose(loss1, loss2, rel_tol=1e-5)
    for name in p1: torch.testing.assert_close(p1[name], p2[name], rtol=1e-5, atol=1e-6)


def test_learning_rate_is_set_before_the_step():
    t = train.Trainer(BigramLanguageModel(TOK.vocab_size), TRAIN, VAL, cfg(), progress=False)
    t.train_step()
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(lr_at(0, 3e-3, 5, 40, 3e-4))  # step 0 used lr(0)
    t.train_step()
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(lr_at(1, 3e-3, 5, 40, 3e-4))


def test_evaluation_does_not_move_the_data_position():
    t = train.Trainer(BigramLanguageModel(TOK.vocab_size), TRAIN, VAL, cfg(), progress=False)
    before = t.batch_rng.get_state()
    a, b = t.estimate_loss(), t.estimate_loss()
    assert a == b  # the same fixed batches each time
    assert torch.equal(before, t.batch_rng.get_state())


def test_evaluate_counts_every_token_once():
    model = BigramLanguageModel(TOK.vocab_size)
    torch.nn.init.zeros_(model.logits_table.weight)  # uniform predictions: loss ln(V) whatever the windows
    assert train.evaluate(model, VAL, context_size=7) == pytest.approx(math.log(TOK.vocab_size))
    torch.manual_seed(0)
    model = BigramLanguageModel(TOK.vocab_size)
    full = model(VAL[None, :-1], VAL[None, 1:])[1].item()  # the bigram ignores context: one long window
    for T in (1, 7, 16, len(VAL) - 1): assert train.evaluate(model, VAL, context_size=T) == pytest.approx(full, rel=1e-5)


@pytest.mark.parametrize("kind", ["bigram", "gpt"])
def test_resume_is_exact(tmp_path, kind):
    "20 steps, save, load into a fresh process state, 20 more == 40 straight (dropout on for the GPT)."
    def fresh():
        if kind == "gpt": return tiny_gpt()
        torch.manual_seed(0)
        return BigramLanguageModel(TOK.vocab_size)
    straight = train.Trainer(fresh(), TRAIN, VAL, cfg(), TOK, progress=False).fit()
    first = train.Trainer(fresh(), TRAIN, VAL, cfg(), TOK, out_dir=tmp_path, progress=False).fit(20)
    assert first.step == 20
    torch.manual_seed(123)  # scramble the global RNG: the resumed run must restore it
    model, tok = train.load_checkpoint(tmp_path, kind=kind)
    second = train.Trainer(model, TRAIN, VAL, cfg(), tok, out_dir=tmp_path, progress=False)
    second.load_state_dict(train.load_trainer_state(tmp_path))
    second.fit()
    assert second.step == 40
    p1, p2 = params(straight.model), params(second.model)
    for name in p1: torch.testing.assert_close(p1[name], p2[name], rtol=1e-5, atol=1e-6)
    steps = [m["step"] for m in train.read_metrics(tmp_path / "metrics.jsonl") if "loss" in m]
    assert steps == list(range(5, 41, 5))  # one record per log interval, none duplicated by the resume


def test_ctrl_c_stops_at_a_step_boundary_with_a_checkpoint(tmp_path, monkeypatch):
    t = train.Trainer(BigramLanguageModel(TOK.vocab_size), TRAIN, VAL, cfg(max_iters=1000), TOK, out_dir=tmp_path,
                      progress=False)
    step = t.train_step

    def step_then_interrupt():
        loss = step()
        if t.step == 7: os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C now
        return loss
    monkeypatch.setattr(t, "train_step", step_then_interrupt)
    handler = signal.getsignal(signal.SIGINT)
    t.fit()
    assert t.interrupted and t.step == 7
    assert signal.getsignal(signal.SIGINT) is handler  # restored
    assert train.load_trainer_state(tmp_path)["step"] == 7


def test_metrics_and_plot_are_written(tmp_path):
    t = train.Trainer(BigramLanguageModel(TOK.vocab_size), TRAIN, VAL, cfg(max_iters=20), TOK, out_dir=tmp_path,
                      progress=False).fit()
    records = train.read_metrics(tmp_path / "metrics.jsonl")
    assert [m["step"] for m in records if "val_loss" in m] == [0, 10, 20]
    assert all(m["tokens_per_s"] > 0 for m in records if "loss" in m)
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "best" / "model.safetensors").exists()
    assert t.best_val == min(m["val_loss"] for m in records if "val_loss" in m and m["step"] > 0)


def test_bad_configurations():
    with pytest.raises(ValueError, match="max_iters"): cfg(max_iters=0)
    with pytest.raises(ValueError, match="dtype"): cfg(dtype="float8")
    with pytest.raises(ValueError, match="too few"):
        train.Trainer(BigramLanguageModel(TOK.vocab_size), TRAIN, VAL[:10], cfg(), progress=False)
    with pytest.raises(ValueError, match="longer than the model"):
        train.Trainer(tiny_gpt(), TRAIN, VAL, cfg(context_size=32), progress=False)


def test_devices_and_dtypes():
    assert train.resolve_device("cpu") == torch.device("cpu")
    assert train.resolve_device("auto").type in ("cpu", "cuda", "mps")
    for bad in ("tpu", "gpu", "cuda:x", "meta"):
        with pytest.raises(ValueError, match="unknown device"): train.resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="not available"): train.resolve_device("cuda:0")
    cpu = torch.device("cpu")
    assert train.resolve_dtype("float32", cpu) == torch.float32
    expected = torch.bfloat16 if train.cpu_has_fast_bf16() else torch.float32
    assert train.resolve_dtype("auto", cpu) == expected


def test_a_fresh_run_starts_a_new_metrics_log(tmp_path):
    for _ in range(2):
        train.Trainer(BigramLanguageModel(TOK.vocab_size), TRAIN, VAL, cfg(max_iters=10), TOK, out_dir=tmp_path,
                      progress=False).fit()
    assert [m["step"] for m in train.read_metrics(tmp_path / "metrics.jsonl") if "val_loss" in m] == [0, 10]

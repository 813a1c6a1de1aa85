"The training loop and its callbacks: accumulation, learning-rate timing, evaluation, exact resume, signals, metrics."
import json
import math
import os
import signal

import pytest
import torch

from nanogpt_plus import device, train
from nanogpt_plus.bigram import BigramLanguageModel
from nanogpt_plus.checkpoint import load_checkpoint, load_trainer_state
from nanogpt_plus.gpt import GPT, GPTConfig
from nanogpt_plus.optim import lr_at
from nanogpt_plus.tokenizer import CharTokenizer

CORPUS = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
TOK = CharTokenizer(CORPUS)
DATA = torch.tensor(TOK.encode(CORPUS * 40))
TRAIN, VAL = DATA[:int(0.9 * len(DATA))], DATA[int(0.9 * len(DATA)):]


def tiny_gpt(seed=0, dropout=0.1):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=TOK.vocab_size, context_size=16, n_layer=2, n_head=2, n_embd=16, dropout=dropout))


def bigram(seed=0):
    torch.manual_seed(seed)
    return BigramLanguageModel(TOK.vocab_size)


def cfg(**kw):
    base = dict(max_iters=40, batch_size=4, context_size=16, learning_rate=3e-3, warmup_iters=5, eval_interval=10,
                eval_iters=2, log_interval=5, dtype="float32")
    return train.TrainConfig(**(base | kw))


def trainer(model, config=None, out_dir=None, **kw):
    config = config or cfg()
    return train.Trainer(model, TRAIN, VAL, config,
                         callbacks=train.standard_callbacks(config, out_dir, TOK if out_dir else None, progress=False), **kw)


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", ["bigram", "gpt"])
def test_accumulation_equals_the_big_batch(kind):
    "One step on a batch of 8 == one step on 2 micro-batches of 4 (same windows), clipping included."
    results = []
    for batch_size, k in ((8, 1), (4, 2)):
        model = tiny_gpt(dropout=0.0) if kind == "gpt" else bigram()
        t = train.Trainer(model, TRAIN, VAL, cfg(batch_size=batch_size, grad_accum_steps=k, grad_clip=0.01))
        loss = t.train_step()
        results.append((loss, params(model)))
    (loss1, p1), (loss2, p2) = results
    assert math.isclose(loss1, loss2, rel_tol=1e-5)
    for name in p1: torch.testing.assert_close(p1[name], p2[name], rtol=1e-5, atol=1e-6)


def test_learning_rate_is_set_before_the_step():
    t = train.Trainer(bigram(), TRAIN, VAL, cfg())
    t.train_step()
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(lr_at(0, 3e-3, 5, 40, 3e-4))  # step 0 used lr(0)
    t.train_step()
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(lr_at(1, 3e-3, 5, 40, 3e-4))


def test_evaluation_does_not_move_the_data_position():
    t = train.Trainer(bigram(), TRAIN, VAL, cfg())
    before = t.batch_rng.get_state()
    assert train.estimate_loss(t, 2) == train.estimate_loss(t, 2)  # the same fixed batches each time
    assert torch.equal(before, t.batch_rng.get_state())


def test_evaluate_counts_every_token_once():
    model = BigramLanguageModel(TOK.vocab_size)
    torch.nn.init.zeros_(model.logits_table.weight)  # uniform predictions: loss ln(V) whatever the windows
    assert train.evaluate(model, VAL, context_size=7) == pytest.approx(math.log(TOK.vocab_size))
    model = bigram()
    full = model(VAL[None, :-1], VAL[None, 1:])[1].item()  # the bigram ignores context: one long window
    for T in (1, 7, 16, len(VAL) - 1): assert train.evaluate(model, VAL, context_size=T) == pytest.approx(full, rel=1e-5)
    assert train.evaluate(model, VAL.numpy().astype("uint16"), context_size=7) == pytest.approx(full, rel=1e-5)


@pytest.mark.parametrize("kind", ["bigram", "gpt"])
def test_resume_is_exact(tmp_path, kind):
    "20 steps, save, load into a fresh process state, 20 more == 40 straight (dropout on for the GPT)."
    fresh = tiny_gpt if kind == "gpt" else bigram
    straight = trainer(fresh()).fit()
    first = trainer(fresh(), out_dir=tmp_path).fit(20)
    assert first.step == 20
    torch.manual_seed(123)  # scramble the global RNG: the resumed run must restore it
    model, tok = load_checkpoint(tmp_path, kind=kind)
    second = trainer(model, out_dir=tmp_path)
    train.restore_trainer_state(second, load_trainer_state(tmp_path))
    second.fit()
    assert second.step == 40
    p1, p2 = params(straight.model), params(second.model)
    for name in p1: torch.testing.assert_close(p1[name], p2[name], rtol=1e-5, atol=1e-6)
    steps = [m["step"] for m in train.read_metrics(tmp_path / "metrics.jsonl") if "loss" in m]
    assert steps == list(range(5, 41, 5))  # one record per log interval, none duplicated by the resume


def test_resume_refuses_other_data_of_the_same_length(tmp_path):
    trainer(bigram(), out_dir=tmp_path).fit(10)
    other = train.Trainer(bigram(), torch.flip(TRAIN, [0]), torch.flip(VAL, [0]), cfg())
    with pytest.raises(ValueError, match="not the same ones"):
        train.restore_trainer_state(other, load_trainer_state(tmp_path))
    shorter = train.Trainer(bigram(), TRAIN[:-5], VAL, cfg())
    with pytest.raises(ValueError, match="the data differ"):
        train.restore_trainer_state(shorter, load_trainer_state(tmp_path))


@pytest.mark.parametrize("sig, reason", [(signal.SIGINT, "interrupted"), (signal.SIGTERM, "terminated")])
def test_a_signal_stops_at_a_step_boundary_with_a_checkpoint(tmp_path, sig, reason):
    class SendSignal(train.Callback):
        def after_step(self, t, loss):
            if t.step == 7: os.kill(os.getpid(), sig)  # as if the user pressed Ctrl-C, or `timeout` ran out, now
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    config = cfg(max_iters=1000)
    t = train.Trainer(bigram(), TRAIN, VAL, config,
                      callbacks=[*train.standard_callbacks(config, tmp_path, TOK, progress=False), SendSignal()]).fit()
    assert (t.stop_reason, t.step) == (reason, 7)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # handed back
    assert load_trainer_state(tmp_path)["step"] == 7


def test_a_diverged_run_keeps_its_last_good_checkpoint(tmp_path):
    class Sabotage(train.Callback):
        def after_step(self, t, loss):
            if t.step == 12:
                with torch.no_grad(): t.model.logits_table.weight[0, 0] = float("nan")
    config = cfg()
    t = train.Trainer(bigram(), TRAIN, VAL, config,
                      callbacks=[*train.standard_callbacks(config, tmp_path, TOK, progress=False), Sabotage()]).fit()
    assert t.stop_reason == "diverged" and t.step < 40
    assert load_trainer_state(tmp_path)["step"] == 10
    model, _ = load_checkpoint(tmp_path)
    assert torch.isfinite(model.logits_table.weight).all()
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))  # strict JSON


def test_metrics_and_plot_are_written(tmp_path):
    t = trainer(bigram(), cfg(max_iters=20), out_dir=tmp_path).fit()
    records = train.read_metrics(tmp_path / "metrics.jsonl")
    assert [m["step"] for m in records if "val_loss" in m] == [0, 10, 20]
    assert all(m["tokens_per_s"] > 0 for m in records if "loss" in m)
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "best" / "model.safetensors").exists()
    checkpoint = next(cb for cb in t.callbacks if isinstance(cb, train.Checkpoint))
    assert checkpoint.best_val == min(m["val_loss"] for m in records if "val_loss" in m and m["step"] > 0)


def test_metrics_stay_valid_json_when_a_value_is_not_finite(tmp_path):
    t = train.Trainer(bigram(), TRAIN, VAL, cfg(), callbacks=[train.MetricsFile(tmp_path)])
    t.fit(1)
    t.log({"step": 1, "val_loss": float("nan"), "lr": float("inf")})
    last = (tmp_path / "metrics.jsonl").read_text().splitlines()[-1]
    assert json.loads(last) == {"step": 1, "val_loss": None, "lr": None}


def test_callbacks_run_in_their_order():
    seen = []
    class Probe(train.Callback):
        def __init__(self, name, order): self.name, self.order = name, order
        def before_fit(self, t): seen.append(self.name)
    train.Trainer(bigram(), TRAIN, VAL, cfg(max_iters=1), callbacks=[Probe("late", 90), Probe("early", 5)]).fit()
    assert seen == ["early", "late"]


def test_bad_configurations():
    with pytest.raises(ValueError, match="max_iters"): cfg(max_iters=0)
    with pytest.raises(ValueError, match="dtype"): cfg(dtype="float8")
    with pytest.raises(ValueError, match="learning_rate"): cfg(learning_rate=float("inf"))
    with pytest.raises(ValueError, match="learning_rate"): cfg(learning_rate=float("nan"))
    with pytest.raises(ValueError, match="too few"): train.Trainer(bigram(), TRAIN, VAL[:10], cfg())
    with pytest.raises(ValueError, match="longer than the model"): train.Trainer(tiny_gpt(), TRAIN, VAL, cfg(context_size=32))


def test_devices_and_dtypes():
    assert train.resolve_device("cpu") == torch.device("cpu")
    assert train.resolve_device("auto").type in ("cpu", "cuda", "mps")
    for bad in ("tpu", "gpu", "cuda:x", "meta"):
        with pytest.raises(ValueError, match="unknown device"): train.resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="not available"): train.resolve_device("cuda:0")
    cpu = torch.device("cpu")
    assert train.resolve_dtype("float32", cpu) == torch.float32
    expected = torch.bfloat16 if device.cpu_has_fast_bf16() else torch.float32
    assert train.resolve_dtype("auto", cpu) == expected
    assert train.Trainer(bigram(), TRAIN, VAL, cfg(dtype="auto")).dtype == torch.float32  # no matmuls to speed up


def test_a_fresh_run_starts_a_new_metrics_log(tmp_path):
    for _ in range(2): trainer(bigram(), cfg(max_iters=10), out_dir=tmp_path).fit()
    assert [m["step"] for m in train.read_metrics(tmp_path / "metrics.jsonl") if "val_loss" in m] == [0, 10]


def test_training_reads_memory_mapped_tokens(tmp_path):
    "A uint16 memory map trains exactly like the int64 tensor of the same ids."
    import numpy as np
    path = tmp_path / "ids.bin"
    np.asarray(DATA, dtype=np.uint16).tofile(path)
    ids = np.memmap(path, dtype=np.uint16, mode="r")
    a = train.Trainer(bigram(), ids[:len(TRAIN)], ids[len(TRAIN):], cfg(max_iters=5)).fit()
    b = train.Trainer(bigram(), TRAIN, VAL, cfg(max_iters=5)).fit()
    torch.testing.assert_close(a.model.logits_table.weight, b.model.logits_table.weight, rtol=0, atol=0)


@pytest.mark.parametrize("path", ["explicit", "fused"])
def test_named_attention_path_is_taken_without_timing(monkeypatch, path):
    "A configuration that names the attention path is never timed: its runs cannot depend on the machine's load."
    from nanogpt_plus import attention
    monkeypatch.setattr(attention, "time_attention_paths", lambda *a, **k: pytest.fail("timed a named path"))
    saved = dict(attention.ATTENTION_PATHS)
    attention.ATTENTION_PATHS.clear()
    try:
        t = train.Trainer(tiny_gpt(dropout=0.0), TRAIN, VAL, cfg(max_iters=2, attention=path))
        t.train_step(); t.train_step()
        assert attention.ATTENTION_PATHS == {attention.attention_key((4, 2, 16, 8), torch.float32): path}
    finally:
        attention.ATTENTION_PATHS.clear(); attention.ATTENTION_PATHS.update(saved)


def test_attention_path_must_be_known():
    with pytest.raises(ValueError, match="unknown attention 'flash'"): cfg(attention="flash")


def test_measured_attention_path_is_timed(monkeypatch):
    "Without a name the path is measured (the shape is small enough for the explicit kernel to be a candidate)."
    from nanogpt_plus import attention
    calls = []
    monkeypatch.setattr(attention, "time_attention_paths", lambda *a, **k: calls.append(a) or {"fused": 1.0, "explicit": 2.0})
    saved = dict(attention.ATTENTION_PATHS)
    attention.ATTENTION_PATHS.clear()
    try:
        train.Trainer(tiny_gpt(dropout=0.0), TRAIN, VAL, cfg(max_iters=1)).train_step()
        assert len(calls) == 1 and list(attention.ATTENTION_PATHS.values()) == ["fused"]
    finally:
        attention.ATTENTION_PATHS.clear(); attention.ATTENTION_PATHS.update(saved)

"""Speed without losing exactness: the attention path measured once per shape, pinned, kept across a resume; the
written-out path against references; the roofs and the profile of chapter 8c. No test checks a time."""
import math

import pytest
import torch
import torch.nn.functional as F

from nanogpt_plus import attention, train
from nanogpt_plus.attention import (ATTENTION_PATHS, _explicit_attention_is_faster, _explicit_causal_attention,
                                    measured_attention_path, time_attention_paths)
from nanogpt_plus.checkpoint import load_checkpoint, load_trainer_state
from nanogpt_plus.gpt import GPT, GPTConfig
from nanogpt_plus.perf import copy_bandwidth, matmul_peak, op_category, profile_step, step_roofline
from nanogpt_plus.tokenizer import CharTokenizer

CORPUS = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
TOK = CharTokenizer(CORPUS)
DATA = torch.tensor(TOK.encode(CORPUS * 40))
TRAIN, VAL = DATA[:int(0.9 * len(DATA))], DATA[int(0.9 * len(DATA)):]
KEY = "float32 (4, 2, 16, 8)"  # the attention shape of tiny_gpt at batch 4


@pytest.fixture(autouse=True)
def own_attention_paths():
    "Each test starts with no measured paths and leaves the process's choices as it found them."
    saved = dict(ATTENTION_PATHS)
    ATTENTION_PATHS.clear()
    yield
    ATTENTION_PATHS.clear()
    ATTENTION_PATHS.update(saved)


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=TOK.vocab_size, context_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.1))


def trainer(model, out_dir=None):
    config = train.TrainConfig(max_iters=40, batch_size=4, context_size=16, learning_rate=3e-3, warmup_iters=5,
                               eval_interval=10, eval_iters=2, log_interval=5, dtype="float32")
    return train.Trainer(model, TRAIN, VAL, config,
                         callbacks=train.standard_callbacks(config, out_dir, TOK if out_dir else None, progress=False))


def test_measured_once_per_shape_and_dtype(monkeypatch):
    calls = []
    def spy(shape, dtype):
        calls.append((shape, dtype))
        return time_attention_paths(shape, dtype, rounds=1)
    monkeypatch.setattr(attention, "time_attention_paths", spy)
    q = torch.randn(2, 2, 8, 4)
    first = _explicit_attention_is_faster(q, None)
    assert _explicit_attention_is_faster(q, None) == first and len(calls) == 1
    assert ATTENTION_PATHS == {"float32 (2, 2, 8, 4)": "explicit" if first else "fused"}
    _explicit_attention_is_faster(q.bfloat16(), None)
    _explicit_attention_is_faster(torch.randn(3, 2, 8, 4), None)
    assert calls == [((2, 2, 8, 4), torch.float32), ((2, 2, 8, 4), torch.bfloat16), ((3, 2, 8, 4), torch.float32)]


@pytest.mark.parametrize("times, path", [({"fused": 2.0, "explicit": 1.0}, "explicit"),
                                         ({"fused": 1.0, "explicit": 2.0}, "fused")])
def test_the_faster_path_is_kept(monkeypatch, times, path):
    monkeypatch.setattr(attention, "time_attention_paths", lambda shape, dtype: times)
    assert measured_attention_path((1, 1, 4, 4), torch.float32) == path
    assert ATTENTION_PATHS["float32 (1, 1, 4, 4)"] == path


def test_fused_outside_cpu_training_and_nothing_measured(monkeypatch):
    monkeypatch.setattr(attention, "time_attention_paths", lambda *a: pytest.fail("measured"))
    q = torch.randn(2, 2, 8, 4)
    with torch.no_grad(): assert not _explicit_attention_is_faster(q, None)  # evaluation, generation
    assert not _explicit_attention_is_faster(q, cache=object())  # key-value cache
    assert not _explicit_attention_is_faster(q.new_empty(64, 4, 1024, 8), None)  # (T, T) weights too large to keep
    assert ATTENTION_PATHS == {}


def test_measuring_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    time_attention_paths((2, 2, 8, 4), torch.bfloat16, rounds=1)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("path", ["explicit", "fused"])
def test_a_pinned_path_is_taken(monkeypatch, path):
    taken = []
    real_explicit, real_sdpa = attention._explicit_causal_attention, F.scaled_dot_product_attention
    monkeypatch.setattr(attention, "_explicit_causal_attention", lambda *a: taken.append("explicit") or real_explicit(*a))
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", lambda *a, **k: taken.append("fused") or real_sdpa(*a, **k))
    ATTENTION_PATHS[KEY] = path
    tiny_gpt()(torch.zeros(4, 16, dtype=torch.long))
    assert taken == [path, path]  # both layers


def relative_rms(a, b):
    "Relative RMS error of `a` against `b` (the absolute one where `b` is all zeros, as q's gradient with one position)."
    diff, norm = (a.double() - b).norm().item(), b.norm().item()
    return diff / norm if norm else diff


@pytest.mark.parametrize("shape", [(2, 4, 64, 48), (3, 6, 256, 64), (1, 1, 1, 8)])
def test_written_out_attention_against_references(shape):
    "float32: the fused kernel's results to round-off; bfloat16: within 2^-7 of float64, outputs and gradients."
    torch.manual_seed(0)
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    dy = torch.randn(shape)
    y = _explicit_causal_attention(q, k, v)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(y, (q, k, v), dy), torch.autograd.grad(ref, (q, k, v), dy)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    q16, k16, v16 = (t.detach().bfloat16().requires_grad_() for t in (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q16, k16, v16))
    y16, y64 = _explicit_causal_attention(q16, k16, v16), _explicit_causal_attention(q64, k64, v64)
    assert relative_rms(y16, y64) < 2 ** -7
    grads16 = torch.autograd.grad(y16, (q16, k16, v16), dy.bfloat16())
    grads64 = torch.autograd.grad(y64, (q64, k64, v64), dy.bfloat16().double())
    for a, b in zip(grads16, grads64): assert relative_rms(a, b) < 2 ** -7


def test_written_out_attention_dropout_is_seeded():
    q = k = v = torch.randn(2, 2, 8, 4)
    torch.manual_seed(1); a = _explicit_causal_attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(1); b = _explicit_causal_attention(q, k, v, dropout_p=0.5)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, _explicit_causal_attention(q, k, v))


def test_resume_keeps_the_path_of_the_first_run(tmp_path):
    "20 steps with the written-out path, a 'new process' that measured the fused one, resume: 20 + 20 == 40."
    ATTENTION_PATHS[KEY] = "explicit"
    straight = trainer(tiny_gpt()).fit()
    trainer(tiny_gpt(), out_dir=tmp_path).fit(20)
    assert load_trainer_state(tmp_path)["attention_paths"] == {KEY: "explicit"}
    ATTENTION_PATHS[KEY] = "fused"  # what another process might have measured
    model, _ = load_checkpoint(tmp_path, kind="gpt")
    second = trainer(model, out_dir=tmp_path)
    train.restore_trainer_state(second, load_trainer_state(tmp_path))
    assert ATTENTION_PATHS[KEY] == "explicit"
    second.fit()
    for (name, a), b in zip(straight.model.state_dict().items(), second.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("saved", [None, "junk", {KEY: "sideways"}, {KEY: 3}])
def test_restore_ignores_missing_or_bad_attention_paths(tmp_path, saved):
    t = trainer(tiny_gpt(), out_dir=tmp_path)
    state = train.trainer_state(t)
    state.pop("attention_paths")
    if saved is not None: state["attention_paths"] = saved
    ATTENTION_PATHS[KEY] = "fused"
    train.restore_trainer_state(trainer(tiny_gpt()), state)
    assert ATTENTION_PATHS == {KEY: "fused"}


def test_roofs_and_profile():
    assert matmul_peak(torch.float32, sizes=(64,), seconds=0.01) > 0
    assert matmul_peak(torch.bfloat16, sizes=(64,), seconds=0.01) > 0
    assert copy_bandwidth(megabytes=4, seconds=0.01) > 0
    assert op_category("aten::addmm") == "linear layers (matmul)" and op_category("gelu_backward") == "GELU"
    assert op_category("aten::_fused_adamw_") == "optimizer and clipping" and op_category("aten::zeros") == "other"
    x = torch.randn(32, 32, requires_grad=True)
    prof = profile_step(lambda: F.gelu(x @ x).sum().backward(), steps=2)
    assert prof["linear layers (matmul)"] > 0 and prof["GELU"] > 0 and all(s >= 0 for s in prof.values())


@pytest.mark.parametrize("size", ["small", "medium", "large"])
def test_roofline_counts_the_flops_mfu_counts(size):
    model = GPT(GPTConfig.from_name(size, dropout=0.0))
    B, T = 2, model.context_size
    roof = step_roofline(model, B, T)
    assert roof["linear layers (matmul)"][0] + roof["attention"][0] == model.flops_per_token(T) * B * T
    assert all(flops >= 0 and nbytes > 0 for flops, nbytes in roof.values())
    assert math.isclose(roof["optimizer and clipping"][1], 40 * model.num_params())


def test_gelu_is_gpt2s_in_float32_and_within_rounding_in_bfloat16():
    from nanogpt_plus.block import MLP, TanhGELU
    assert isinstance(MLP(8).act, TanhGELU)
    torch.manual_seed(0)
    x, g = 4 * torch.randn(64, 1024), torch.randn(64, 1024)
    xf = x.clone().requires_grad_()
    ours, theirs = TanhGELU()(xf), F.gelu(x.clone().requires_grad_(), approximate="tanh")
    assert torch.equal(ours, theirs)  # float32: bit for bit, so GPT-2's weights reproduce OpenAI's outputs
    xb, xr = x.bfloat16().requires_grad_(), x.bfloat16().float().requires_grad_()
    yb, yr = TanhGELU()(xb), F.gelu(xr, approximate="tanh")
    yb.backward(g.bfloat16())
    yr.backward(g.bfloat16().float())
    assert ((yb.float() - yr).abs() <= 5e-4 + 2**-8 * yr.abs()).all()
    assert ((xb.grad.float() - xr.grad).abs() <= 1e-3 * g.abs() + 2**-8 * xr.grad.abs()).all()
    assert not torch.equal(yb, F.gelu(xb.detach(), approximate="tanh"))  # the exact kernel really ran


def test_freed_memory_is_kept_where_glibc_allows(monkeypatch):
    import platform
    from nanogpt_plus import device
    expected = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert device.reuse_freed_memory() is expected
    assert device.reuse_freed_memory() is expected  # idempotent
    monkeypatch.setattr(device.platform, "system", lambda: "Darwin")
    assert device.reuse_freed_memory() is False  # elsewhere: nothing to set, no error
    called = []
    monkeypatch.setattr(train, "reuse_freed_memory", lambda: called.append(True))
    trainer(tiny_gpt())
    assert called == [True]  # the CPU trainer asks for it

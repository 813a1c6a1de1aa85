"""The library's CUDA paths: mixed-precision training steps, exact resume, the key-value cache, chapter 16's decoders
and DDP under torchrun with NCCL.

Every test runs once per device: on the CPU here (small sizes, so the test's logic is exercised in every run) and on
a CUDA GPU where there is one (marker `cuda`; without a GPU those cases are skipped and say why). `tools/gpu_check.sh`
runs them on a GPU machine, with the GPU measurements."""
import os
import subprocess
import sys

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS reproducible: read before CUDA starts

import pytest
import torch

from nanogpt_plus import train
from nanogpt_plus.bigram import generate
from nanogpt_plus.checkpoint import load_checkpoint, load_trainer_state
from nanogpt_plus.fastgen import FastDecoder, prepare_decoding
from nanogpt_plus.gpt import GPT, GPTConfig
from nanogpt_plus.tokenizer import CharTokenizer

CORPUS = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
TOK = CharTokenizer(CORPUS)
DATA = torch.tensor(TOK.encode(CORPUS * 60))
TRAIN, VAL = DATA[:int(0.9 * len(DATA))], DATA[int(0.9 * len(DATA)):]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def tiny_gpt(seed=0, dropout=0.0, **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=TOK.vocab_size, context_size=32, n_layer=2, n_head=2, n_embd=32, dropout=dropout,
                         **kw))


def cfg(**kw):
    base = dict(max_iters=30, batch_size=8, context_size=32, learning_rate=3e-3, warmup_iters=5, eval_interval=10,
                eval_iters=2, log_interval=1, dtype="float32")
    return train.TrainConfig(**(base | kw))


class Losses(train.Callback):
    "Every step's training loss."
    def __init__(self): self.losses = []
    def after_step(self, trainer, loss): self.losses.append(loss)


def losses(device, dtype, steps=30):
    record = Losses()
    t = train.Trainer(tiny_gpt(), TRAIN, VAL, cfg(max_iters=steps, dtype=dtype), device, [record]).fit()
    return t, record.losses


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("device", DEVICES)
def test_mixed_precision_steps_follow_float32(device, dtype):
    """30 steps in bfloat16 or float16 (with the gradient scaler) from the same weights and batches as float32: every
    step's loss within 0.05 nats of float32's (bfloat16 keeps 8 bits of mantissa: its losses drift by ~0.01 here), and
    the loss falls by at least 1 nat in both."""
    reference = losses(device, "float32")[1]
    trainer, mixed = losses(device, dtype)
    assert trainer.dtype == getattr(torch, dtype)
    assert trainer.scaler.is_enabled() == (dtype == "float16")  # float16 gradients underflow without the scaler
    assert len(mixed) == len(reference) == 30
    gap = max(abs(a - b) for a, b in zip(mixed, reference))
    assert gap < 0.05, f"{dtype} losses moved {gap:.3f} nats from float32's"
    assert reference[0] - reference[-1] > 1.0 and mixed[0] - mixed[-1] > 1.0


@pytest.mark.parametrize("device", DEVICES)
def test_resume_is_exact(tmp_path, device):
    "12 steps straight == 6 steps, a checkpoint read back onto the device, then 6 more: the same weights, bit for bit."
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # on a GPU: no atomics that add in a different order each run
    try:
        config = cfg(max_iters=12)
        straight = train.Trainer(tiny_gpt(dropout=0.1), TRAIN, VAL, config, device).fit()
        callbacks = train.standard_callbacks(config, tmp_path, TOK, progress=False)
        first = train.Trainer(tiny_gpt(dropout=0.1), TRAIN, VAL, config, device, callbacks).fit(6)
        assert first.step == 6
        torch.manual_seed(123)  # scramble the global RNGs: the resumed run must restore them
        model, _ = load_checkpoint(tmp_path, device=device)
        second = train.Trainer(model, TRAIN, VAL, config, device, train.standard_callbacks(config, tmp_path, TOK, progress=False))
        train.restore_trainer_state(second, load_trainer_state(tmp_path))
        second.fit()
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert second.step == 12
    a, b = straight.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys()
    for name in a: assert torch.equal(a[name], b[name]), f"{name} differs after the resume"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("modern", [False, True], ids=["gpt2-block", "modern"])
def test_kv_cache_equals_no_cache(device, modern):
    "Greedy generation past the context window: the same tokens with and without the key-value cache, in float32."
    extra = dict(pos_emb="rope", norm="rmsnorm", qk_norm=True, mlp="relu2", tie_embeddings=False) if modern else {}
    model = tiny_gpt(**extra).to(device).eval()
    idx = torch.tensor([TOK.encode("First")], device=device)
    plain = model.generate(idx, 60, top_k=1)
    cached = model.generate(idx, 60, top_k=1, use_kv_cache=True)
    assert plain.device.type == torch.device(device).type
    assert torch.equal(plain, cached)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    "A tiny GPT trained for 40 steps, saved as `train` saves it."
    out = tmp_path_factory.mktemp("ckpt")
    config = cfg(max_iters=40)
    train.Trainer(tiny_gpt(), TRAIN, VAL, config, "cpu", train.standard_callbacks(config, out, TOK, progress=False)).fit()
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_fast_decoders_run_on_the_device(checkpoint, device, dtype):
    """Chapter 16's decoders on the device: its C kernels are for CPUs, so on a GPU every layer falls back to PyTorch's
    kernels (said in the layer's repr); greedy tokens with its cache equal the same decoder's without a cache."""
    model, _ = load_checkpoint(checkpoint, device=device)
    model = prepare_decoding(model, dtype)
    paths = {m.extra_repr().rsplit(", ", 1)[-1] for m in model.modules() if type(m).__name__ == "DecodeLinear"}
    if torch.device(device).type == "cuda": assert paths == {"PyTorch"}
    idx = torch.tensor([TOK.encode("All:\n")], device=device)
    fast = generate(model, idx, 40, top_k=1, decoder=FastDecoder(model, 1))
    plain = generate(model, idx, 40, top_k=1)
    assert fast.device.type == torch.device(device).type
    assert torch.equal(fast, plain)


@pytest.mark.parametrize("device", DEVICES)
def test_ddp_under_torchrun_runs_a_step(tmp_path, device):
    "`torchrun --nproc-per-node 1 ... --parallel ddp`: NCCL on a GPU (gloo on a CPU), one process, two steps, a checkpoint."
    data = tmp_path / "input.txt"
    data.write_text(CORPUS * 60, encoding="utf-8")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m", "nanogpt_plus",
           "train", "gpt", "--parallel", "ddp", "--device", device, "--data", str(data), "--out-dir", str(tmp_path / "run"),
           "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--context-size", "16", "--batch-size", "4",
           "--max-iters", "2", "--eval-interval", "2", "--eval-iters", "1", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert load_trainer_state(tmp_path / "run")["step"] == 2

"""GPT-2 loading (chapter 10): parity with transformers on tiny random models, strict checks, offline errors, CLI.

No test needs the network: models are random `transformers` GPT-2s saved with `save_pretrained` into temp dirs.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

from nanogpt_plus.gpt import GPT, GPTConfig
from nanogpt_plus.gpt2 import (GPT2_HUB_REPOS, config_from_hf, gpt2_weight_map, load_gpt2,
                               plan_gpt2_load)

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

# (n_layer, n_head, n_embd, n_positions): one head, several, odd widths, deeper
SHAPES = [(1, 1, 16, 32), (2, 2, 32, 64), (3, 4, 48, 96), (2, 6, 24, 40)]
PROMPT = "To be, or not to be, that is the question:"


def save_tiny(path, n_layer, n_head, n_embd, n_positions, seed=0, init=0.2, **kw):
    "A random transformers GPT-2 saved with save_pretrained; wide init so greedy decoding does not just repeat."
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions,
                     initializer_range=init, **kw)
    model = GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_gpt2")
    save_tiny(d, 2, 2, 32, 64)
    return d


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "nanogpt_plus.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "L{}H{}C{}T{}".format(*s))
def test_parity_with_transformers(tmp_path, shape):
    hf = save_tiny(tmp_path, *shape, seed=sum(shape))
    model, tok = load_gpt2(tmp_path)
    n_layer, n_head, n_embd, n_positions = shape
    assert model.config == GPTConfig(50257, n_positions, n_layer, n_head, n_embd, dropout=0.0, bias=True)
    assert model.lm_head.weight is model.tok_emb.weight  # tied after loading
    assert not model.training
    idx = torch.tensor([tok.encode(PROMPT)] * 2)  # (2, T)
    with torch.no_grad():
        ours, loss = model(idx)
        theirs = hf(idx).logits
    assert loss is None
    assert (ours - theirs).abs().max().item() < 1e-5
    n_new = n_positions - idx.size(1)  # right up to the context size, which transformers cannot exceed
    ref = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n_new, do_sample=False,
                      eos_token_id=None, pad_token_id=tok.eot_token)
    assert len(set(ref[0, idx.size(1):].tolist())) > 3  # a real test: not one token repeated
    for use_kv_cache in (False, True):
        out = model.generate(idx, n_new, temperature=0, use_kv_cache=use_kv_cache)
        assert out.tolist() == ref.tolist(), f"greedy tokens differ (use_kv_cache={use_kv_cache})"


def test_hub_layout_without_prefix_and_with_mask_buffers(tmp_path):
    "Hub files name tensors without `transformer.` and may hold `attn.bias` masks and an equal lm_head."
    from safetensors.torch import load_file, save_file
    hf = save_tiny(tmp_path / "a", 2, 2, 32, 64)
    sd = load_file(tmp_path / "a" / "model.safetensors")
    hub = {k.removeprefix("transformer."): v for k, v in sd.items()}
    for i in range(2):
        hub[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64, dtype=torch.bool))
        hub[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    hub["lm_head.weight"] = hub["wte.weight"].clone()
    (tmp_path / "b").mkdir()
    save_file(hub, tmp_path / "b" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "b" / "config.json").write_text((tmp_path / "a" / "config.json").read_text())
    model, tok = load_gpt2(tmp_path / "b")
    idx = torch.tensor([tok.encode(PROMPT)])
    with torch.no_grad():
        assert (model(idx)[0] - hf(idx).logits).abs().max().item() < 1e-5
    hub["lm_head.weight"] = hub["lm_head.weight"] + 1  # an untied head cannot be represented
    save_file(hub, tmp_path / "b" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lm_head different from its token embedding"):
        load_gpt2(tmp_path / "b")


def test_sharded_checkpoint(tmp_path):
    hf = save_tiny(tmp_path, 2, 2, 32, 64)
    hf.save_pretrained(tmp_path, max_shard_size="1MB")  # several files plus model.safetensors.index.json
    (tmp_path / "model.safetensors").unlink(missing_ok=True)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model, tok = load_gpt2(tmp_path)
    idx = torch.tensor([tok.encode(PROMPT)])
    with torch.no_grad():
        assert (model(idx)[0] - hf(idx).logits).abs().max().item() < 1e-5


def test_device_and_dtype(tiny_dir):
    model, _ = load_gpt2(tiny_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert model.lm_head.weight is model.tok_emb.weight


@pytest.mark.parametrize("name,dims", [("gpt2", (12, 12, 768)), ("gpt2-medium", (24, 16, 1024)),
                                       ("gpt2-large", (36, 20, 1280)), ("gpt2-xl", (48, 25, 1600))])
def test_real_sizes_on_meta(name, dims):
    "Every published size: transformers' shapes on the meta device fit our GPT's, with no download."
    assert name in GPT2_HUB_REPOS
    n_layer, n_head, n_embd = dims
    hf_cfg = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    config = config_from_hf(hf_cfg.to_dict())
    assert config == GPTConfig.from_name(name)
    with torch.device("meta"):
        hf, ours = GPT2LMHeadModel(hf_cfg), GPT(config)
    shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    plan = plan_gpt2_load(ours, shapes)
    assert len(plan) == len(gpt2_weight_map(n_layer)) == 4 + 12 * n_layer
    params = dict(ours.named_parameters())
    for o, t, transpose in plan:
        assert tuple(params[o].shape) == (shapes[t][::-1] if transpose else shapes[t])


def test_strict_name_and_shape_checks():
    cfg = GPTConfig(vocab_size=50257, context_size=64, n_layer=2, n_head=2, n_embd=32)
    with torch.device("meta"):
        ours = GPT(cfg)
        hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64))
    shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    plan_gpt2_load(ours, shapes)
    with pytest.raises(ValueError, match=r"missing from the file: h\.0\.ln_2\.bias"):
        plan_gpt2_load(ours, {k: v for k, v in shapes.items() if k != "transformer.h.0.ln_2.bias"})
    with pytest.raises(ValueError, match=r"in the file but not in our GPT: h\.0\.attn\.rotary"):
        plan_gpt2_load(ours, {**shapes, "transformer.h.0.attn.rotary": (4,)})
    with pytest.raises(ValueError, match=r"wpe\.weight \(65, 32\) -> pos_emb\.weight \(64, 32\)"):
        plan_gpt2_load(ours, {**shapes, "transformer.wpe.weight": (65, 32)})
    with pytest.raises(ValueError, match=r"c_fc\.weight \(128, 32\) transposed -> blocks\.1\.mlp\.fc\.weight"):
        plan_gpt2_load(ours, {**shapes, "transformer.h.1.mlp.c_fc.weight": (128, 32)})  # forgot the transpose
    deeper = {**shapes, **{k.replace("h.1.", "h.2."): v for k, v in shapes.items() if ".h.1." in k}}
    with pytest.raises(ValueError, match=r"not in our GPT: h\.2\.attn\.c_attn\.bias"):
        plan_gpt2_load(ours, deeper)


@pytest.mark.parametrize("change,match", [
    ({"activation_function": "relu"}, "activation_function='relu'"),
    ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon=1e-06"),
    ({"n_inner": 100}, "n_inner=100"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings=False"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True"),
    ({"model_type": "llama"}, "model_type='llama'"),
    ({"n_embd": 30}, "divisible"),
])
def test_config_rejects_what_we_cannot_run(change, match):
    hf = GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=64).to_dict()
    with pytest.raises(ValueError, match=match):
        config_from_hf({**hf, **change})


def test_config_accepts_n_ctx_and_pytorch_tanh():
    hf = GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=64).to_dict()
    del hf["n_positions"]
    hf.update(n_ctx=48, activation_function="gelu_pytorch_tanh")
    assert config_from_hf(hf).context_size == 48


def test_bad_directories(tmp_path, tiny_dir):
    with pytest.raises(FileNotFoundError, match="neither a GPT-2 size"):
        load_gpt2(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="neither a GPT-2 size"):
        load_gpt2("gpt-3")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_gpt2(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_gpt2(tmp_path)
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="we read only safetensors"):
        load_gpt2(tmp_path)
    blob = (tiny_dir / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="does not fit its declared bytes"):
        load_gpt2(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 100)
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_gpt2(tmp_path)


def test_small_vocab_refused(tmp_path):
    save_tiny(tmp_path, 1, 1, 16, 32, vocab_size=1000, bos_token_id=0, eos_token_id=0)
    with pytest.raises(ValueError, match="vocabulary of 1000 tokens"):
        load_gpt2(tmp_path)


OFFLINE_CODE = """
from nanogpt_plus.gpt2 import load_gpt2
try:
    load_gpt2("gpt2-medium")
except ConnectionError as e:
    print("ConnectionError:", e)
"""


def test_offline_not_cached_function(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", OFFLINE_CODE], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    msg = r.stdout
    assert msg.startswith("ConnectionError: GPT-2 'gpt2-medium' is not in the Hugging Face cache")
    assert str(tmp_path) in msg  # where the cache is
    assert "https://huggingface.co/openai-community/gpt2-medium" in msg  # where to download from
    assert "config.json and model.safetensors" in msg and "--gpt2-config DIR" in msg  # what, and where to put it


def test_hub_cache_is_used_offline(tmp_path, tiny_dir):
    "Files already in the hub cache load with HF_HUB_OFFLINE=1: no network needed after the first download."
    snap = tmp_path / "hub" / "models--openai-community--gpt2"
    commit = "0" * 40
    (snap / "refs").mkdir(parents=True)
    (snap / "refs" / "main").write_text(commit)
    (snap / "snapshots" / commit).mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        (snap / "snapshots" / commit / f).write_bytes((tiny_dir / f).read_bytes())
    code = "from nanogpt_plus.gpt2 import load_gpt2\nm, _ = load_gpt2('gpt2')\nprint(m.config.n_layer, m.config.n_embd)"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["2", "32"]


def test_cli_generate_from_directory(tiny_dir):
    r = cli("generate", "gpt", "--gpt2-config", str(tiny_dir), "--max-new-tokens", "5", "--temperature", "0",
            "--continue-tokens", PROMPT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(PROMPT) and len(r.stdout.strip()) > len(PROMPT)
    r2 = cli("generate", "gpt", "--gpt2-config", str(tiny_dir), "--max-new-tokens", "5", "--temperature", "0",
             "--continue-tokens", PROMPT, "--use-kv-cache")
    assert r2.returncode == 0, r2.stderr
    assert r2.stdout == r.stdout  # greedy: the cache changes nothing


def test_cli_offline_error(tmp_path):
    r = cli("generate", "gpt", "--gpt2-config", "gpt2", "--max-new-tokens", "5",
            env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("error: GPT-2 'gpt2' is not in the Hugging Face cache")
    assert "model.safetensors" in r.stderr


def test_offline_without_hf_hub_offline_fails_at_once(tmp_path):
    "No network and HF_HUB_OFFLINE unset: one quick check of the host, no retries, and the advice to set it."
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"} | {"HF_HOME": str(tmp_path),
                                                                        "HF_ENDPOINT": "https://hub.invalid"}
    r = subprocess.run([sys.executable, "-m", "nanogpt_plus", "generate", "gpt", "--gpt2-config", "gpt2"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "hub.invalid cannot be reached" in r.stderr and "HF_HUB_OFFLINE=1" in r.stderr and "--gpt2-config DIR" in r.stderr
    assert "Retrying" not in r.stderr  # the hub client's retries (half a minute offline) never started


def test_an_absurd_config_is_refused_before_allocating(tmp_path):
    "A local GPT-2 directory whose config.json asks for a million layers: refused by the memory check, at once."
    import resource
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024,
                                                      "n_embd": 768, "n_layer": 1_000_000, "n_head": 12}))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(MemoryError, match="needs at least"): load_gpt2(tmp_path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: nothing big was allocated


def test_cli_bad_directory(tmp_path):
    r = cli("generate", "gpt", "--gpt2-config", str(tmp_path / "nope"), "--max-new-tokens", "5")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "neither a GPT-2 size" in r.stderr


def test_local_directory_named_like_a_size(tmp_path, tiny_dir, monkeypatch):
    "`./gpt2` or a Path is a directory, never the hub: works offline with an empty cache."
    import shutil
    shutil.copytree(tiny_dir, tmp_path / "gpt2")
    monkeypatch.chdir(tmp_path)
    for source in ("./gpt2", Path("gpt2"), tmp_path / "gpt2"):
        model, _ = load_gpt2(source)
        assert model.config.n_embd == 32

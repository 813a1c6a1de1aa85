"Chapter 17: grouped-query attention, loading transformers directories, exporting to them, and `nanogpt-plus export`."
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the interop tests compare with transformers")

from nanogpt_plus.bigram import generate
from nanogpt_plus.bpe import BPETokenizer
from nanogpt_plus.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from nanogpt_plus.fastgen import FastDecoder, prepare_decoding, save_quantized
from nanogpt_plus.gpt import GPT, GPTConfig
from nanogpt_plus.interop import export_hf, load_hf, write_atomically
from nanogpt_plus.lora import add_lora, describe_base, save_adapter
from nanogpt_plus.tokenizer import CharTokenizer

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
CORPUS = "First Citizen:\nBefore we proceed any further, hear me speak.\nAll:\nSpeak, speak.\n"
MODERN = dict(bias=False, pos_emb="rope", norm="rmsnorm", mlp="swiglu")


def tiny_hf(kind: str, path, **changes):
    "A random transformers model of `kind` saved in `path` (grouped-query attention, untied head where it can)."
    torch.manual_seed(0)
    common = dict(vocab_size=80, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, rope_theta=20_000.0, rms_norm_eps=1e-5)
    cfg = {"llama": lambda: transformers.LlamaConfig(**common, intermediate_size=96),
           "qwen3": lambda: transformers.Qwen3Config(**common, intermediate_size=96, head_dim=8),
           "nanochat": lambda: transformers.NanoChatConfig(**common, intermediate_size=128),
           "gpt2": lambda: transformers.GPT2Config(vocab_size=80, n_positions=64, n_embd=32, n_layer=2, n_head=4)}[kind]()
    for k, v in changes.items(): setattr(cfg, k, v)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(path, **({"max_shard_size": "20KB"} if kind == "llama" and changes.get("_shard") else {}))
    return model


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {kind: (root / kind, tiny_hf(kind, root / kind)) for kind in ("gpt2", "llama", "qwen3", "nanochat")}


def test_gqa_cache_and_greedy():
    "n_kv_head shrinks the cache by n_head / n_kv_head; greedy tokens agree with and without it, and in FastDecoder."
    sizes = {}
    for kv in (4, 2, 1):
        torch.manual_seed(0)
        m = GPT(GPTConfig(vocab_size=50, context_size=32, n_layer=2, n_head=4, n_embd=32, n_kv_head=kv, **MODERN)).eval()
        sizes[kv] = m.new_kv_cache(1).nbytes
        x = torch.randint(0, 50, (2, 5))
        a = m.generate(x, 20, top_k=1)
        assert torch.equal(a, m.generate(x, 20, top_k=1, use_kv_cache=True))
        assert torch.equal(a, generate(m, x, 20, temperature=0, decoder=FastDecoder(m, 2)))
    assert sizes[4] == 2 * sizes[2] == 4 * sizes[1]
    with pytest.raises(ValueError, match="n_kv_head"): GPTConfig(vocab_size=5, context_size=8, n_layer=1, n_head=4, n_embd=8, n_kv_head=3)


def test_old_config_json_loads(tmp_path):
    "A checkpoint whose config.json predates n_kv_head, rope_theta and norm_eps loads, bit-identical."
    tok = CharTokenizer(CORPUS)
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=tok.vocab_size, context_size=16, n_layer=1, n_head=2, n_embd=16)).eval()
    save_checkpoint(tmp_path, m, tok)
    meta = json.loads((tmp_path / "config.json").read_text())
    for field in ("n_kv_head", "rope_theta", "norm_eps"): del meta["config"][field]
    (tmp_path / "config.json").write_text(json.dumps(meta))
    (tmp_path / "checkpoint.json").unlink()  # as old as its config: written before checkpoints had a manifest
    back, _ = load_checkpoint(tmp_path)
    x = torch.randint(0, tok.vocab_size, (1, 10))
    assert torch.equal(back(x)[0], m(x)[0])


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen3", "nanochat"])
def test_load_hf_equals_transformers(hf_dirs, kind):
    path, theirs = hf_dirs[kind]
    ours, tok = load_hf(path)
    assert tok is None  # no tokenizer files in the directory
    x = torch.randint(0, 80, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(): assert (theirs(x).logits - ours(x)[0]).abs().max() < 1e-5
    greedy = theirs.generate(x[:1], max_new_tokens=30, do_sample=False)
    assert torch.equal(greedy, ours.generate(x[:1], 30, top_k=1))
    assert torch.equal(greedy, ours.generate(x[:1], 30, top_k=1, use_kv_cache=True))
    for dtype in ("bfloat16", "int8"):  # chapter 16's decoders: same tokens as the quantised model's own forward
        q, _ = load_hf(path)
        q = prepare_decoding(q, dtype)
        assert torch.equal(generate(q, x[:1], 30, temperature=0, decoder=FastDecoder(q, 1)),
                           generate(q, x[:1], 30, temperature=0, decoder=q.decoder(1)))


def test_sharded(tmp_path):
    theirs = tiny_hf("llama", tmp_path, _shard=True)
    assert (tmp_path / "model.safetensors.index.json").exists() and not (tmp_path / "model.safetensors").exists()
    ours, _ = load_hf(tmp_path)
    x = torch.randint(0, 80, (1, 10))
    with torch.no_grad(): assert (theirs(x).logits - ours(x)[0]).abs().max() < 1e-5


@pytest.mark.parametrize("kind,field,value", [
    ("llama", "rope_scaling", {"rope_type": "linear", "factor": 2.0}), ("qwen3", "use_sliding_window", True),
    ("qwen3", "attention_bias", True), ("llama", "hidden_act", "gelu"), ("qwen3", "head_dim", 16),
    ("llama", "intermediate_size", 100), ("llama", "model_type", "mistral"), ("llama", "num_hidden_layers", None)])
def test_refusals_name_the_field(hf_dirs, tmp_path, kind, field, value):
    shutil.copytree(hf_dirs[kind][0], tmp_path / "m")
    p = tmp_path / "m" / "config.json"
    cfg = json.loads(p.read_text()) | {field: value}
    p.write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    with pytest.raises(CheckpointError, match=field): load_hf(tmp_path / "m")


def test_damaged_files(hf_dirs, tmp_path):
    def fresh(name):
        shutil.copytree(hf_dirs["llama"][0], tmp_path / name)
        return tmp_path / name
    d = fresh("trunc"); w = d / "model.safetensors"; w.write_bytes(w.read_bytes()[:3000])
    with pytest.raises(CheckpointError, match="truncated"): load_hf(d)
    d = fresh("label"); (d / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a safetensors file"): load_hf(d)
    d = fresh("shape"); c = json.loads((d / "config.json").read_text()); c["vocab_size"] = 90
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(CheckpointError, match="embed_tokens"): load_hf(d)
    d = fresh("tie"); c = json.loads((d / "config.json").read_text()); c["tie_word_embeddings"] = True
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(CheckpointError, match="tie_word_embeddings"): load_hf(d)
    d = fresh("json"); (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"): load_hf(d)


def export_cases():
    bpe = BPETokenizer.train(CORPUS * 20, 300)
    chars = CharTokenizer(CORPUS)
    return {"gpt2": (GPTConfig(vocab_size=chars.vocab_size, context_size=32, n_layer=2, n_head=2, n_embd=16, bias=False), chars),
            "llama": (GPTConfig(vocab_size=bpe.vocab_size, context_size=32, n_layer=2, n_head=4, n_embd=32, n_kv_head=2,
                                tie_embeddings=False, rope_theta=5e4, **MODERN), bpe),
            "llama-bias": (GPTConfig(vocab_size=chars.vocab_size, context_size=32, n_layer=1, n_head=2, n_embd=16,
                                     **(MODERN | dict(bias=True))), chars),
            "qwen3": (GPTConfig(vocab_size=bpe.vocab_size, context_size=32, n_layer=2, n_head=4, n_embd=32, qk_norm=True,
                                norm_eps=1e-6, n_kv_head=2, **MODERN), bpe)}


@pytest.mark.parametrize("name", ["gpt2", "llama", "llama-bias", "qwen3"])
def test_export_hf_round_trip(tmp_path, name):
    config, tok = export_cases()[name]
    torch.manual_seed(0)
    model = GPT(config).eval()
    out = export_hf(model, tok, tmp_path / "out")
    pipe = transformers.pipeline("text-generation", model=str(out))
    assert pipe.model.config.model_type == name.split("-")[0]
    prompt = "All:\nSpeak, "
    ids = tok.encode(prompt)
    assert pipe.tokenizer(prompt)["input_ids"] == ids  # AutoTokenizer gives our ids
    text = pipe(prompt, max_new_tokens=20, do_sample=False)[0]["generated_text"]
    assert text == tok.decode(model.generate(torch.tensor([ids]), 20, top_k=1)[0].tolist())
    back, tok2 = load_hf(out)
    x = torch.tensor([ids])
    assert torch.equal(back(x)[0], model(x)[0]) and tok2.encode(prompt) == ids
    if isinstance(tok, CharTokenizer): assert isinstance(tok2, CharTokenizer) and tok2.chars == tok.chars


def test_export_refusals_and_atomic_writes(tmp_path):
    chars = CharTokenizer(CORPUS)
    base = dict(vocab_size=chars.vocab_size, context_size=16, n_layer=1, n_head=2, n_embd=16)
    for kwargs, field in [
            (MODERN | dict(mlp="relu2"), "mlp"), (MODERN | dict(qk_norm=True), "norm_eps"),
            (dict(n_kv_head=1), "n_kv_head"), (dict(logit_softcap=15.0), "logit_softcap")]:
        with pytest.raises(ValueError, match=field): export_hf(GPT(GPTConfig(**base, **kwargs)), chars, tmp_path / "x")
    assert list(tmp_path.iterdir()) == []  # refused before anything was written
    model = GPT(GPTConfig(**base))
    export_hf(model, chars, tmp_path / "x")
    with pytest.raises(FileExistsError): export_hf(model, chars, tmp_path / "x")
    before = sorted(p.name for p in (tmp_path / "x").iterdir())

    def failing(path):
        path.mkdir(); (path / "half").write_text("half")
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError, match="No space left"): write_atomically(tmp_path / "x", failing, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]  # no temporary left, the old export kept
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == before


def cli(*args, cwd=None):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "nanogpt_plus", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def one_line_error(r):
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    return r.stderr


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    tok = CharTokenizer(CORPUS)
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=tok.vocab_size, context_size=32, n_layer=2, n_head=4, n_embd=32, n_kv_head=2, **MODERN))
    save_checkpoint(root / "modern", gpt, tok)
    (root / "corpus.txt").write_text(CORPUS * 30)
    base = GPT(GPTConfig(vocab_size=tok.vocab_size, context_size=32, n_layer=1, n_head=2, n_embd=16))
    save_checkpoint(root / "base", base, tok)
    base, _ = load_checkpoint(root / "base")
    adapted = add_lora(base, 2, 4.0)
    for n, p in adapted.named_parameters():
        if "lora" in n: torch.nn.init.normal_(p, std=0.5)  # a non-zero update, so merging changes the weights
    save_adapter(root / "adapter", adapted, describe_base(base, str(root / "base")))
    save_quantized(root / "int8", prepare_decoding(load_checkpoint(root / "modern")[0], "int8", kernel=False), tok)
    return root


def test_cli_export_generate_train(ckpts, tmp_path):
    r = cli("export", "--checkpoint", ckpts / "modern", "--format", "hf", "--out", tmp_path / "hf")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "llama"
    ours = cli("generate", "gpt", "--checkpoint", ckpts / "modern", "--temperature", "0", "--max-new-tokens", "20",
               "--continue-tokens", "All:")
    theirs = cli("generate", "gpt", "--checkpoint", tmp_path / "hf", "--temperature", "0", "--max-new-tokens", "20",
                 "--continue-tokens", "All:")
    assert ours.returncode == 0 and ours.stdout == theirs.stdout, theirs.stderr
    r = cli("train", "gpt", "--init-from", tmp_path / "hf", "--data", ckpts / "corpus.txt", "--max-iters", "2",
            "--out-dir", tmp_path / "ft", "--no-progress", "--batch-size", "2", "--eval-interval", "1", "--eval-iters", "1")
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(tmp_path / "ft")[0].config.n_kv_head == 2
    r = cli("train", "gpt", "--init-from", tmp_path / "hf", "--use-lora", "--data", ckpts / "corpus.txt", "--max-iters", "2",
            "--out-dir", tmp_path / "lora", "--no-progress", "--batch-size", "2", "--eval-interval", "1", "--eval-iters", "1")
    assert r.returncode == 0, r.stderr  # LoRA on a transformers directory: the adapter names it as its base
    r = cli("generate", "gpt", "--checkpoint", tmp_path / "lora", "--temperature", "0", "--max-new-tokens", "5")
    assert r.returncode == 0, r.stderr
    r = cli("export", "--checkpoint", tmp_path / "lora", "--format", "hf", "--out", tmp_path / "lora-hf")
    assert r.returncode == 0, r.stderr


def test_cli_full_finetune_needs_a_storable_tokenizer(tmp_path):
    "A byte-level BPE from tokenizer.json cannot go into our checkpoints: full fine-tuning says so; LoRA would not need it."
    config, tok = export_cases()["llama"]
    export_hf(GPT(config), tok, tmp_path / "bpe-hf")
    (tmp_path / "corpus.txt").write_text(CORPUS * 30)
    err = one_line_error(cli("train", "gpt", "--init-from", tmp_path / "bpe-hf", "--data", tmp_path / "corpus.txt",
                             "--max-iters", "1", "--out-dir", tmp_path / "ft"))
    assert "cannot be stored in our checkpoints" in err and not (tmp_path / "ft" / "config.json").exists()


def test_cli_export_lora_merged(ckpts, tmp_path):
    r = cli("export", "--checkpoint", ckpts / "adapter", "--format", "hf", "--out", tmp_path / "hf")
    assert r.returncode == 0, r.stderr
    merged, tok = load_hf(tmp_path / "hf")
    base, _ = load_checkpoint(ckpts / "base")
    x = torch.tensor([tok.encode("All:")])
    assert not torch.equal(merged(x)[0], base(x)[0])  # the adapter is in the exported weights


def test_cli_bad_inputs(ckpts, hf_dirs, tmp_path):
    (tmp_path / "taken").mkdir()
    assert "exists already" in one_line_error(cli("export", "--checkpoint", ckpts / "modern", "--format", "hf", "--out", tmp_path / "taken"))
    assert "int8" in one_line_error(cli("export", "--checkpoint", ckpts / "int8", "--format", "hf", "--out", tmp_path / "q"))
    assert "does not exist" in one_line_error(cli("export", "--checkpoint", tmp_path / "missing", "--format", "hf", "--out", tmp_path / "m"))
    assert "tokenizer" in one_line_error(cli("generate", "gpt", "--checkpoint", hf_dirs["llama"][0], "--max-new-tokens", "3"))
    d = tmp_path / "trunc"
    shutil.copytree(hf_dirs["qwen3"][0], d)
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:2000])
    one_line_error(cli("export", "--checkpoint", d, "--format", "hf", "--out", tmp_path / "t"))
    assert not (tmp_path / "t").exists() and not (tmp_path / "q").exists()
    (tmp_path / "taken.gguf").write_bytes(b"mine")
    assert "exists" in one_line_error(cli("export", "--checkpoint", ckpts / "base", "--format", "gguf", "--out", tmp_path / "taken.gguf"))
    assert (tmp_path / "taken.gguf").read_bytes() == b"mine"  # nothing of the user's is lost


def test_cli_exports_gguf_and_onnx(ckpts, tmp_path):
    "`export --format gguf|onnx` (chapter 17b's writers): llama.cpp's file with its key/value heads, onnxruntime's graph."
    gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install nanogpt-plus[interop])")
    onnx = pytest.importorskip("onnx", reason="the onnx package is not installed (pip install nanogpt-plus[interop])")
    r = cli("export", "--checkpoint", ckpts / "modern", "--format", "gguf", "--gguf-dtype", "f16", "--out", tmp_path / "m.gguf")
    assert r.returncode == 0, r.stderr
    fields = gguf.GGUFReader(tmp_path / "m.gguf").fields
    assert fields["general.architecture"].contents() == "llama"
    assert (fields["llama.attention.head_count"].contents(), fields["llama.attention.head_count_kv"].contents()) == (4, 2)
    r = cli("export", "--checkpoint", ckpts / "modern", "--format", "onnx", "--out", tmp_path / "m.onnx")
    assert r.returncode == 0, r.stderr
    graph = onnx.load(tmp_path / "m.onnx").graph
    assert [i.name for i in graph.input] == ["input_ids", "past_keys", "past_values"]
    assert graph.input[1].type.tensor_type.shape.dim[2].dim_value == 2  # the cache holds the 2 key/value heads


def test_byte_level_tokenizer_streams_bytes(tmp_path):
    "Our byte-level BPE through tokenizer.json: the same ids, and bytes per token, so a stream never splits a character."
    from nanogpt_plus.interop import load_hf_tokenizer
    text = "Héllo wörld, ünïcode ✓ text, with <|endoftext|> inside. " * 20
    bpe = BPETokenizer.train(text, 290)
    export_hf(GPT(GPTConfig(vocab_size=bpe.vocab_size, context_size=16, n_layer=1, n_head=2, n_embd=16)), bpe, tmp_path / "x")
    tok = load_hf_tokenizer(tmp_path / "x")
    ids = tok.encode(text)
    assert ids == bpe.encode(text) and tok.decode(ids) == text and bpe.eot_token in ids
    assert all(tok.decode_bytes([i]) == bpe.decode_bytes([i]) for i in range(bpe.vocab_size))

"""Chapter 12's modern GPT (RoPE, RMSNorm, QK-norm, ReLU² and SwiGLU, untied head, soft-cap, zero init), Muon, the WSD
schedule, FLOP counting and budgets, and their checkpoints and command line."""
import json
import math

import pytest
import torch

from nanogpt_plus import cli, train
from nanogpt_plus.attention import CausalSelfAttention, Rotary
from nanogpt_plus.block import TanhGELU
from nanogpt_plus.checkpoint import estimate_params, load_checkpoint, load_trainer_state, save_checkpoint
from nanogpt_plus.gpt import GPT, GPTConfig
from nanogpt_plus.optim import MuonWithAdamW, lr_at, lr_wsd, make_muon_optimizer, make_optimizer, newton_schulz_flops
from nanogpt_plus.tokenizer import CharTokenizer

CORPUS = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
TOK = CharTokenizer(CORPUS)
DATA = torch.tensor(TOK.encode(CORPUS * 40))
TRAIN, VAL = DATA[:int(0.9 * len(DATA))], DATA[int(0.9 * len(DATA)):]
MODERN = dict(pos_emb="rope", norm="rmsnorm", qk_norm=True, mlp="relu2", tie_embeddings=False, logit_softcap=15.0,
              zero_init=True)
CONFIGS = {"gpt2": {}, **{k: {k: v} for k, v in MODERN.items()}, "swiglu": dict(mlp="swiglu"), "all": MODERN,
           "all-swiglu": MODERN | dict(mlp="swiglu")}


def config(bias=False, **changes):
    return GPTConfig(**dict(vocab_size=TOK.vocab_size, context_size=16, n_layer=2, n_head=2, n_embd=16, bias=bias)
                     | changes)


def model(seed=0, jitter=True, **changes):
    "A tiny GPT; `jitter` moves zero-initialised weights off zero, so that tokens and positions tell apart."
    torch.manual_seed(seed)
    m = GPT(config(**changes))
    if jitter:
        with torch.no_grad():
            for p in m.parameters(): p.add_(0.05 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("bias", [False, True])
def test_shapes_and_causality(name, bias):
    m = model(bias=bias, **CONFIGS[name]).eval()
    idx = torch.randint(TOK.vocab_size, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, loss = m(idx, idx)
        assert logits.shape == (3, 16, TOK.vocab_size) and loss.shape == ()
        assert m(idx, last_only=True)[0].shape == (3, 1, TOK.vocab_size)
        for t in range(16):
            changed = idx.clone()
            changed[:, t:] = (changed[:, t:] + 1) % TOK.vocab_size
            other = m(changed)[0]
            assert torch.equal(other[:, :t], logits[:, :t])  # bit for bit
            assert not torch.equal(other[:, t:], logits[:, t:])


@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_tokens_agree_with_and_without_the_cache(name):
    "Inside and far past the 16-token window, a batch of prompts; for a RoPE model too."
    m = model(**CONFIGS[name]).eval()
    prompts = torch.randint(TOK.vocab_size, (3, 5), generator=torch.Generator().manual_seed(2))
    plain = m.generate(prompts, 45, temperature=0)
    assert torch.equal(m.generate(prompts, 45, temperature=0, use_kv_cache=True), plain)
    chunks = m.new_kv_cache(3)  # a prompt, single tokens and a chunk give the logits of one full pass
    with torch.no_grad():
        seq = plain[:, :16]
        pieces = [m(seq[:, a:b], kv_cache=chunks)[0] for a, b in [(0, 6), (6, 7), (7, 12), (12, 16)]]
        torch.testing.assert_close(torch.cat(pieces, 1), m(seq)[0], rtol=1e-4, atol=1e-5)


def test_rope_keeps_norms_and_scores_depend_only_on_distance():
    torch.manual_seed(0)
    rot = Rotary(32)
    q, k = torch.randn(2, 4, 9, 32, dtype=torch.float64), torch.randn(2, 4, 9, 32, dtype=torch.float64)
    for past in (0, 3, 1000):
        qr, kr = rot(q, k, past)
        torch.testing.assert_close(qr.norm(dim=-1), q.norm(dim=-1))
        torch.testing.assert_close(kr.norm(dim=-1), k.norm(dim=-1))
    scores = lambda past: (lambda qr, kr: qr @ kr.transpose(-2, -1))(*rot(q, k, past))  # (B, nh, 9, 9)
    torch.testing.assert_close(scores(0), scores(37), rtol=1e-5, atol=1e-5)  # every pair shifted by 37
    torch.testing.assert_close(scores(0), scores(513), rtol=1e-3, atol=1e-3)  # angles in float32: 513 rad to ~3e-5
    assert not torch.allclose(scores(0), q @ k.transpose(-2, -1))  # but it does change the scores


def test_rope_attention_has_no_position_table_and_needs_even_heads():
    m = model(pos_emb="rope")
    assert m.pos_emb is None and all("pos_emb" not in n for n, _ in m.named_parameters())
    assert isinstance(m.blocks[0].attn.rotary, Rotary)
    with pytest.raises(ValueError, match="head size must be even"): Rotary(7)
    with pytest.raises(ValueError, match="head size n_embd // n_head must be even"):
        config(n_embd=18, n_head=2, pos_emb="rope")
    config(n_embd=18, n_head=2)  # fine with a learned table
    assert CausalSelfAttention(16, 2).rotary is None and CausalSelfAttention(16, 2).qk_norm is None


@pytest.mark.parametrize("changes,message", [
    (dict(mlp="tanh"), "unknown mlp 'tanh': choose one of gelu, relu2, swiglu"),
    (dict(pos_emb="alibi"), "unknown pos_emb 'alibi': choose one of learned, rope"),
    (dict(norm="batchnorm"), "unknown norm 'batchnorm': choose one of layernorm, rmsnorm"),
    (dict(logit_softcap=-5.0), "logit_softcap must be a positive number"),
    (dict(logit_softcap=0), "logit_softcap must be a positive number"),
    (dict(logit_softcap=float("inf")), "logit_softcap must be a positive number"),
    (dict(logit_softcap=True), "logit_softcap must be a positive number"),
    (dict(qk_norm=1), "qk_norm must be True or False"),
    (dict(tie_embeddings="no"), "tie_embeddings must be True or False"),
    (dict(zero_init=None), "zero_init must be True or False")])
def test_bad_field_values(changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")): config(**changes)


def test_defaults_are_gpt2():
    c = config()
    assert (c.pos_emb, c.norm, c.qk_norm, c.mlp, c.tie_embeddings, c.logit_softcap, c.zero_init) == \
        ("learned", "layernorm", False, "gelu", True, None, False)
    m = model(jitter=False)
    assert m.lm_head.weight is m.tok_emb.weight and type(m.blocks[0].ln1) is torch.nn.LayerNorm
    assert type(m.blocks[0].mlp.act) is TanhGELU and m.blocks[0].attn.rotary is None


def test_zero_init_and_untied_head():
    m = model(jitter=False, zero_init=True, tie_embeddings=False)
    assert m.lm_head.weight is not m.tok_emb.weight
    for b in m.blocks: assert not b.attn.proj.weight.any() and not b.mlp.proj.weight.any()
    assert not m.lm_head.weight.any() and m.tok_emb.weight.std() > 0.01 and m.blocks[0].attn.qkv.weight.std() > 0.01
    tied = model(jitter=False, zero_init=True)  # the tied head is the embedding, which keeps its values
    assert tied.tok_emb.weight.std() > 0.01 and not tied.blocks[1].mlp.proj.weight.any()
    assert model(jitter=False, zero_init=False, tie_embeddings=False).blocks[0].attn.proj.weight.any()


def test_soft_cap_bounds_the_logits():
    m = model(logit_softcap=2.0)
    with torch.no_grad():
        for p in m.parameters(): p.mul_(30)
        logits = m(torch.randint(TOK.vocab_size, (2, 16)))[0]
    assert logits.abs().max() <= 2.0 and logits.dtype == torch.float32


@pytest.mark.parametrize("name", CONFIGS)
def test_parameter_estimate_is_exact(name):
    for bias in (False, True):
        c = config(bias=bias, **CONFIGS[name])
        assert estimate_params("gpt", c) == GPT(c).num_params()


def test_flops_per_token():
    C, L, V, T = 16, 2, TOK.vocab_size, 16
    blocks = L * 12 * C * C
    assert model().flops_per_token() == 6 * (blocks + V * C) + 12 * L * C * T  # tied: the head once
    assert model(tie_embeddings=False).flops_per_token() == 6 * (blocks + V * C) + 12 * L * C * T  # the input: a lookup
    assert model(pos_emb="rope").flops_per_token() == model().flops_per_token()
    H = 16 * math.ceil(8 * C / 3 / 16)  # SwiGLU's hidden width
    assert model(mlp="swiglu").flops_per_token() == 6 * (L * (4 * C * C + 3 * C * H) + V * C) + 12 * L * C * T


def test_muon_groups_cover_every_parameter_once():
    for name in ("gpt2", "all", "all-swiglu"):
        m = model(bias=True, **CONFIGS[name])
        opt = make_muon_optimizer(m, 1e-3)
        ids = [id(p) for g in opt.param_groups for p in g["params"]]
        assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in m.parameters()}
        muon = opt.optimizers["muon"].param_groups[0]["params"]
        assert all(p.dim() == 2 for p in muon) and len(muon) == 4 * 2  # qkv, proj, fc, proj per block
        assert id(m.lm_head.weight) not in {id(p) for p in muon} and id(m.tok_emb.weight) not in {id(p) for p in muon}
        assert opt.flops_per_step == sum(newton_schulz_flops(p.shape) for p in muon)


def test_muon_needs_linear_layers():
    from nanogpt_plus.bigram import BigramLanguageModel
    with pytest.raises(ValueError, match="linear layers"): make_muon_optimizer(BigramLanguageModel(5), 1e-3)


def test_wsd_schedule():
    kw = dict(max_lr=1.0, warmup_iters=10, decay_iters=100, min_lr=0.1)
    lrs = [lr_wsd(s, cooldown_frac=0.3, **kw) for s in range(120)]
    assert lrs[:10] == [lr_at(s, **kw) for s in range(10)]  # the same warm-up
    assert set(lrs[10:70]) == {1.0} and lrs[99] == pytest.approx(0.1) and set(lrs[100:]) == {0.1}
    assert all(a > b for a, b in zip(lrs[69:100], lrs[70:100]))  # strictly down during the decay
    c = train.TrainConfig(max_iters=100, learning_rate=1.0, min_lr=0.1, warmup_iters=10, schedule="wsd", cooldown_frac=0.3)
    assert [c.lr(s) for s in range(120)] == lrs


def tcfg(**kw):
    base = dict(max_iters=30, batch_size=4, context_size=16, learning_rate=3e-3, warmup_iters=5, eval_interval=10,
                eval_iters=2, log_interval=5, dtype="float32", optimizer="muon", schedule="wsd", muon_lr=6e-3)
    return train.TrainConfig(**(base | kw))


def run_trainer(m, c, out_dir=None):
    return train.Trainer(m, TRAIN, VAL, c, callbacks=train.standard_callbacks(c, out_dir, TOK if out_dir else None,
                                                                              progress=False))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_resume_is_bit_exact_with_muon_and_wsd(tmp_path, dtype):
    c = tcfg(dtype=dtype)
    straight = run_trainer(model(**MODERN, jitter=False), c).fit()
    first = run_trainer(model(**MODERN, jitter=False), c, tmp_path).fit(10)
    assert isinstance(first.optimizer, MuonWithAdamW) and first.step == 10
    torch.manual_seed(99)
    m, _ = load_checkpoint(tmp_path, kind="gpt")
    second = run_trainer(m, c, tmp_path)
    train.restore_trainer_state(second, load_trainer_state(tmp_path))
    second.fit()
    assert second.step == 30 and second.flops == straight.flops
    for (n, a), b in zip(straight.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), n


def test_resume_refuses_another_optimizer(tmp_path):
    run_trainer(model(), tcfg(optimizer="adamw"), tmp_path).fit(10)
    t = run_trainer(model(), tcfg())
    with pytest.raises(ValueError, match="optimizer state"): train.restore_trainer_state(t, load_trainer_state(tmp_path))


def test_flops_include_muon_and_a_budget_sets_the_steps():
    t = run_trainer(model(), tcfg(max_iters=3)).fit()
    per_step = 4 * 16 * model().flops_per_token(16) + t.optimizer.flops_per_step
    assert t.optimizer.flops_per_step > 0 and t.flops == 3 * per_step
    record = [r for r in t.metrics if "loss" in r][-1]
    assert record["flops"] == t.flops and "time_s" in record
    adamw = run_trainer(model(), tcfg(max_iters=3, optimizer="adamw")).fit()
    assert adamw.flops == 3 * 4 * 16 * model().flops_per_token(16)
    budget = run_trainer(model(), tcfg(max_flops=7.5 * per_step))
    assert budget.config.max_iters == 7 and budget.config.lr(6) == pytest.approx(budget.config.min_lr or 3e-4)
    budget.fit()
    assert budget.step == 7 and budget.flops <= 7.5 * per_step
    with pytest.raises(ValueError, match="less than one step"): run_trainer(model(), tcfg(max_flops=per_step / 2))


@pytest.mark.parametrize("changes,message", [
    (dict(optimizer="sgd"), "unknown optimizer 'sgd'"), (dict(schedule="linear"), "unknown schedule 'linear'"),
    (dict(cooldown_frac=0.0), "cooldown_frac must be in (0, 1]"), (dict(muon_momentum=1.0), "muon_momentum"),
    (dict(muon_lr=0.0), "muon_lr must be > 0"), (dict(max_flops=-1.0), "max_flops must be a finite number"),
    (dict(max_flops=float("nan")), "max_flops must be a finite number")])
def test_bad_train_settings(changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("]", r"\]")): tcfg(**changes)


def test_modern_checkpoints_round_trip_and_old_ones_still_load(tmp_path):
    m = model(**MODERN)
    save_checkpoint(tmp_path / "new", m, TOK)
    loaded, _ = load_checkpoint(tmp_path / "new")
    assert loaded.config == m.config and loaded.lm_head.weight is not loaded.tok_emb.weight
    idx = torch.randint(TOK.vocab_size, (2, 16))
    assert torch.equal(loaded.eval()(idx)[0], m.eval()(idx)[0])
    saved = json.loads((tmp_path / "new" / "config.json").read_text())["config"]
    assert saved["pos_emb"] == "rope" and saved["logit_softcap"] == 15.0
    old = model()  # a checkpoint from before chapter 12: its config.json has no new fields and no manifest
    d = save_checkpoint(tmp_path / "old", old, TOK)
    (d / "checkpoint.json").unlink()
    meta = json.loads((d / "config.json").read_text())
    meta["config"] = {k: v for k, v in meta["config"].items() if k not in MODERN}
    (d / "config.json").write_text(json.dumps(meta))
    loaded, _ = load_checkpoint(d)
    assert loaded.config == old.config and loaded.lm_head.weight is loaded.tok_emb.weight
    assert torch.equal(loaded.eval()(idx)[0], old.eval()(idx)[0])


def test_the_command_line_builds_and_trains_a_modern_gpt(tmp_path, capsys):
    text = tmp_path / "input.txt"
    text.write_text(CORPUS * 60, encoding="utf-8")
    out = tmp_path / "ck"
    flags = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--context-size", "16", "--batch-size", "4",
             "--eval-iters", "1", "--eval-interval", "4", "--no-progress", "--pos-emb", "rope", "--norm", "rmsnorm",
             "--qk-norm", "--mlp", "swiglu", "--no-tie-embeddings", "--logit-softcap", "30", "--zero-init",
             "--optimizer", "muon", "--muon-lr", "0.01", "--schedule", "wsd", "--cooldown-frac", "0.5"]
    assert cli.main(["train", "gpt", "--data", str(text), "--max-iters", "6", "--out-dir", str(out), *flags]) == 0
    m, _ = load_checkpoint(out)
    assert (m.config.pos_emb, m.config.norm, m.config.qk_norm, m.config.mlp, m.config.tie_embeddings,
            m.config.logit_softcap, m.config.zero_init) == ("rope", "rmsnorm", True, "swiglu", False, 30.0, True)
    state = load_trainer_state(out)["config"]
    assert (state["optimizer"], state["muon_lr"], state["schedule"], state["cooldown_frac"]) == ("muon", 0.01, "wsd", 0.5)
    stored = (out / "run.toml").read_text()
    assert "tie_embeddings = false" in stored and 'optimizer = "muon"' in stored
    again = tmp_path / "again"  # the stored run configuration repeats the run
    assert cli.main(["train", "--config", str(out / "run.toml"), "--out-dir", str(again), "--no-progress"]) == 0
    assert load_checkpoint(again)[0].config == m.config
    assert torch.equal(load_checkpoint(again)[0].lm_head.weight, m.lm_head.weight)
    budget = tmp_path / "budget"  # a budget of FLOPs instead of a number of steps, from a TOML file
    (tmp_path / "b.toml").write_text(f'model = "gpt"\ndata = "{text}"\nn_layer = 1\nn_head = 2\nn_embd = 16\n'
                                     'context_size = 16\nbatch_size = 4\neval_iters = 1\nmax_flops = 2e9\n'
                                     'optimizer = "muon"\nqk_norm = true\ntie_embeddings = false\n')
    assert cli.main(["train", "--config", str(tmp_path / "b.toml"), "--out-dir", str(budget), "--no-progress"]) == 0
    records = train.read_metrics(budget / "metrics.jsonl")
    assert 0 < records[-1]["step"] and max(r.get("flops", 0) for r in records) <= 2e9
    assert load_checkpoint(budget)[0].config.qk_norm is True
    capsys.readouterr()  # a budget wins over a number of steps (from a file or a flag), and says so
    assert cli.main(["train", "--config", str(tmp_path / "b.toml"), "--max-iters", "1", "--out-dir", str(budget),
                     "--overwrite", "--no-progress"]) == 0
    assert "--max-iters is ignored" in capsys.readouterr().err
    assert load_trainer_state(budget)["step"] == records[-1]["step"]


def cli_fails(capsys, *args, match):
    capsys.readouterr()
    assert cli.main(["train", *map(str, args)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and "Traceback" not in err, err


def test_command_line_errors(tmp_path, capsys):
    text = tmp_path / "input.txt"
    text.write_text(CORPUS * 60, encoding="utf-8")
    common = ["--data", text, "--out-dir", tmp_path / "o", "--no-progress"]
    cli_fails(capsys, "gpt", *common, "--n-embd", "18", "--n-head", "2", "--pos-emb", "rope", match="must be even")
    cli_fails(capsys, "bigram", *common, "--mlp", "swiglu", match="--mlp applies to `train gpt`")
    cli_fails(capsys, "gpt", *common, "--max-flops", "10", match="less than one step")
    (tmp_path / "bad.toml").write_text('model = "gpt"\nqk_norm = "yes"\n')
    cli_fails(capsys, "--config", tmp_path / "bad.toml", match="qk_norm = 'yes' is not a valid value")
    (tmp_path / "bad2.toml").write_text('model = "gpt"\nmlp = "tanh"\n')
    cli_fails(capsys, "--config", tmp_path / "bad2.toml", match="mlp must be one of gelu, relu2, swiglu")
    for flag, value in (("--logit-softcap", "-1"), ("--mlp", "tanh"), ("--optimizer", "sgd")):
        with pytest.raises(SystemExit) as e: cli.main(["train", "gpt", flag, value])
        assert e.value.code == 2 and flag in capsys.readouterr().err


def test_step_flops_is_the_trainers_count():
    from nanogpt_plus.speedrun import step_flops
    for name in ("gpt2", "all", "all-swiglu"):
        for optimizer in ("adamw", "muon"):
            c = config(**CONFIGS[name])
            tc = tcfg(optimizer=optimizer, batch_size=3, grad_accum_steps=2)
            assert step_flops(c, tc)["total"] == run_trainer(GPT(c), tc).flops_per_step


def test_a_run_started_and_summarised(tmp_path):
    from nanogpt_plus.speedrun import run_summary, start_run, wait_run
    text = tmp_path / "input.txt"
    text.write_text(CORPUS * 60, encoding="utf-8")
    (tmp_path / "r.toml").write_text(f'model = "gpt"\ndata = "{text}"\nn_layer = 1\nn_head = 2\nn_embd = 16\n'
                                     'context_size = 16\nbatch_size = 4\neval_iters = 1\neval_interval = 5\n'
                                     'max_flops = 1e9\noptimizer = "muon"\npos_emb = "rope"\n')
    wait_run(start_run(str(tmp_path / "r.toml"), tmp_path / "out", threads=1))
    s = run_summary(tmp_path / "out")
    state = load_trainer_state(tmp_path / "out")
    assert s["flops"] == state["flops"] <= 1e9 and s["steps"] == state["step"] > 0 and s["tokens"] == 64 * s["steps"]
    assert 0 < s["val_loss"] < 5 and s["curve"] and s["curve"][-1][0] == s["flops"]
    with pytest.raises(RuntimeError, match="failed"): wait_run(start_run("no-such-recipe", tmp_path / "x"))
    with pytest.raises(ValueError, match="no finished run"):
        (tmp_path / "out" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
        run_summary(tmp_path / "out")


@pytest.mark.parametrize("name,budget", [("speedrun-5e13", 5e13), ("speedrun-1.5e14", 1.5e14)])
def test_speedrun_recipes_spend_their_budget(name, budget):
    from nanogpt_plus.speedrun import step_flops
    args = cli.parse_args(["train", "--config", name])
    assert args.model == "gpt" and args.max_flops == budget
    fields = {f: getattr(args, f) for f in cli.TRAIN_FIELDS if getattr(args, f, None) is not None}
    tc = train.TrainConfig(**fields)
    shape = {f: getattr(args, f) for f in (*cli.SHAPE_FLAGS, "dropout") if getattr(args, f) is not None}
    c = GPTConfig.from_name("small", vocab_size=65, context_size=args.context_size, **shape)
    per_step = step_flops(c, tc)["total"]
    steps = int(budget // per_step)
    assert budget - per_step < steps * per_step <= budget and steps >= 100

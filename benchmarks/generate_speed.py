"""Generation speed against the roofline, Hugging Face `transformers` and llama.cpp, in one process, on every thread count asked for.

Two model shapes, random weights (the same in every variant): GPT-2 124M (12 layers, 12 heads, 768 wide, 50,257
tokens), whose weights come from memory at every token, and chapter 8's recipe shape (4 layers, 4 heads, 192 wide,
65 characters; a context of 256 here so that prompt and new tokens fit in one window), whose weights fit in the
last-level cache. A 16-token prompt, 200 new tokens, greedy, batch 1, CPU.

Variants: ours, prepared as `nanogpt-plus generate --dtype D --use-kv-cache` does (chapter 16's `prepare_decoding`
and `FastDecoder`), with float32, bfloat16 and int8 weights; two peers: `transformers`' `GPT2LMHeadModel.generate`
with its defaults (its cache) in float32 and in bfloat16, and llama.cpp (`llama-cpp-python`) on the same weights
exported to GGUF by chapter 17b's `export_gguf`, f32 against our float32, f16 against our bfloat16, q8_0 against
our int8 (see `llama_cpp_peer`: greedy, token by token, exactly as many tokens as ours; its key/value cache in
float32 as ours; without llama.cpp's extra buffer types, whose AMX int8 kernels crash on some CPUs).

Threads: each thread count of `--threads` (default: torch's default, then 1) is a block of its own: every variant
and the roof probes run with that many threads (`torch.set_num_threads`; llama.cpp's `n_threads` and
`n_threads_batch`). Every round times each variant once, in turn, and reads a 256 MB buffer with chapter 16's
reader on the same threads (the memory-bandwidth roof of that moment) and times a 1024 x 1024 fp32 matrix product
(the compute roof), each probe three times in a row, keeping the fastest (the threads of the variant before, which
llama.cpp keeps spinning for a while, can only slow a probe down). Results are medians over rounds; each ratio is the median of the ratios within rounds, so a
change of machine load (other jobs) hits both sides of a ratio alike.

For each of ours: tokens/s, the ratio to transformers float32 (and to transformers in the same precision, bfloat16
against bfloat16), the bytes one token reads (weights and key-value cache), the bandwidth roof (bandwidth / bytes
per token), the compute roof (fp32 FLOP/s / FLOPs per token: the kernels multiply in fp32 for every format), the
fraction of the lower of the two reached, and the fraction of greedy tokens equal to our float32 ones; against
llama.cpp in the matching GGUF format, the ratio of tokens/s, the fraction of greedy tokens that are the same and
how many come before the first difference; and for each llama.cpp format its tokens/s and the fraction of its greedy
tokens equal to our float32 ones. A shape that cannot be exported to GGUF or that llama.cpp cannot load gets
`llama_cpp_problem`, saying why, and no llama.cpp columns for what failed.

    python benchmarks/generate_speed.py [--models gpt2,recipe] [--threads default,1] [--rounds 3] [--new-tokens 200]
                                        [--llama-cpp f32,f16,q8_0] [--out nanogpt_plus/results/generate_speed.jsonl]

Prints one JSON line per model and thread count (progress goes to stderr); with --out, also appends them there.
"""
import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

import torch

PROBE_REPEATS = 3  # a roof is the best the machine gives: the probes read 3 times a round and keep the fastest, since
#                   the threads of the variant timed just before (llama.cpp's spin a while) can only slow them down
SHAPES = {"gpt2": dict(vocab_size=50257, context_size=1024, n_layer=12, n_head=12, n_embd=768),
          "recipe": dict(vocab_size=65, context_size=256, n_layer=4, n_head=4, n_embd=192)}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def fail(message):
    "Stop with one sentence on stderr and exit code 2, as the command line does."
    log(f"error: {message}")
    sys.exit(2)


def copy_weights(peer, ours):
    "Copy a transformers GPT-2 into our GPT (its Conv1D weights are stored transposed)."
    sd = peer.state_dict()
    with torch.no_grad():
        ours.tok_emb.weight.copy_(sd["transformer.wte.weight"])
        ours.pos_emb.weight.copy_(sd["transformer.wpe.weight"])
        for i, b in enumerate(ours.blocks):
            p = f"transformer.h.{i}."
            for mine, theirs in [(b.ln1, "ln_1"), (b.ln2, "ln_2")]:
                mine.weight.copy_(sd[p + theirs + ".weight"])
                mine.bias.copy_(sd[p + theirs + ".bias"])
            for mine, theirs in [(b.attn.qkv, "attn.c_attn"), (b.attn.proj, "attn.c_proj"),
                                 (b.mlp.fc, "mlp.c_fc"), (b.mlp.proj, "mlp.c_proj")]:
                mine.weight.copy_(sd[p + theirs + ".weight"].t())
                mine.bias.copy_(sd[p + theirs + ".bias"])
        ours.ln_f.weight.copy_(sd["transformer.ln_f.weight"])
        ours.ln_f.bias.copy_(sd["transformer.ln_f.bias"])


GGUF_FOR = {"float32": "f32", "bfloat16": "f16", "int8": "q8_0"}  # llama.cpp's format against each of ours
NO_LLAMA_CPP = "the llama.cpp peer needs llama-cpp-python (pip install nanogpt-plus[interop]); or run with --llama-cpp ''"


def open_llama(path, threads, n_ctx):
    """llama.cpp on the GGUF file `path` with `threads` threads for the prompt and for each token and a float32
    key/value cache (as ours), else llama-cpp-python's defaults, but for its extra buffer types: their AMX int8
    kernels crashed the process on the book's CPU (chapter 17b); llama.cpp then runs its ordinary kernels."""
    try:
        import llama_cpp
        import llama_cpp.llama as module
    except ImportError as e: raise RuntimeError(NO_LLAMA_CPP) from e
    default = module.llama_cpp.llama_model_default_params
    def params():
        p = default(); p.use_extra_bufts = False; return p
    module.llama_cpp.llama_model_default_params = params
    try: return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, type_k=0, type_v=0,
                                verbose=False)
    finally: module.llama_cpp.llama_model_default_params = default


def llama_cpp_peer(path, threads, n_ctx):
    """llama.cpp (`llama-cpp-python`) as a peer: a function `(prompt ids, n) -> n greedy new ids` on the GGUF file
    `path`. It feeds one token at a time and takes the argmax of the logits itself, so it makes exactly `n` tokens
    (no stop at an end-of-text token), with the same work as ours: the prompt in one batch, then n - 1 steps."""
    llm = open_llama(path, threads, n_ctx)  # first: it says what to install if llama-cpp-python is missing
    import llama_cpp
    import numpy as np
    V = llm.n_vocab()

    def run(prompt, n):
        llm.reset()  # the next eval overwrites the cache from position 0
        llm.eval(list(prompt))
        out = []
        for i in range(n):
            if i: llm.eval(out[-1:])
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(V,))  # the last token's
            out.append(int(logits.argmax()))
        return out
    run.llm = llm  # to close it when the block is done
    return run


def export_ggufs(ref, directory, formats):
    "`ref` (our float32 GPT) as a GGUF file per format in `directory`; a {format: path}."
    from nanogpt_plus.formats import export_gguf
    from nanogpt_plus.tokenizer import CharTokenizer
    # llama.cpp loads no GGUF file without a vocabulary. Random weights need no real one, and the peer is fed ids:
    # 65 ASCII characters (the recipe shape's count), padded with unused entries to GPT-2's 50,257.
    tok = CharTokenizer("".join(chr(c) for c in range(32, 32 + 65)))
    return {g: export_gguf(ref, tok, f"{directory}/{ref.config.n_layer}x{ref.config.n_embd}-{g}.gguf", dtype=g,
                           overwrite=True) for g in formats}


def build(shape, dtypes, peer_dtypes):
    "Our prepared variants and the transformers peers, all with the same random weights."
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    from nanogpt_plus.fastgen import prepare_decoding
    from nanogpt_plus.gpt import GPT, GPTConfig
    hf_logging.set_verbosity_error()
    s = SHAPES[shape]
    torch.manual_seed(0)
    peer = GPT2LMHeadModel(GPT2Config(vocab_size=s["vocab_size"], n_positions=s["context_size"], n_layer=s["n_layer"],
                                      n_head=s["n_head"], n_embd=s["n_embd"])).eval()
    ref = GPT(GPTConfig(**s)).eval()
    copy_weights(peer, ref)
    ours = {}
    for d in dtypes:  # each from a copy of the float32 weights, as `nanogpt-plus generate --dtype d` does
        m = GPT(ref.config).eval()
        m.load_state_dict(ref.state_dict())
        ours[d] = prepare_decoding(m, d)
    peers = {d: (peer if d == "float32" else GPT2LMHeadModel(peer.config).eval()) for d in peer_dtypes}
    for d, p in peers.items():
        if d != "float32": p.load_state_dict(peer.state_dict()); p.to(getattr(torch, d))
    return ours, peers, ref


def measure(shape, threads, ours, peers, args, ggufs=None):
    """One block: every variant and both roof probes, alternating rounds, with `threads` threads. A dict of results.
    `ggufs` ({format: path}): llama.cpp's variants."""
    from nanogpt_plus.bigram import generate
    from nanogpt_plus.fastgen import FastDecoder, kv_cache_bytes, matmul_probe, read_probe, weight_bytes
    torch.set_num_threads(threads)
    n, T0, V = args.new_tokens, args.prompt_tokens, SHAPES[shape]["vocab_size"]
    idx = torch.randint(0, V, (1, T0), generator=torch.Generator().manual_seed(1))

    def run_ours(d, k=n): return generate(ours[d], idx, k, temperature=0, decoder=FastDecoder(ours[d], 1))
    def run_peer(d, k=n):
        return peers[d].generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=k, min_new_tokens=k,
                                 do_sample=False, pad_token_id=0)
    llama, problem = {}, None
    for g, path in (ggufs or {}).items():
        try: llama[g] = llama_cpp_peer(path, threads, T0 + n)
        except ValueError as e:  # llama-cpp-python's "Failed to load model": said in the results, not faked
            problem = f"llama.cpp could not load {path} ({e})"; log(problem)
    prompt = idx[0].tolist()
    probe, mm = 2**28, 1024
    runs = {**{d: (lambda d=d: run_ours(d)) for d in ours}, **{f"transformers_{d}": (lambda d=d: run_peer(d)) for d in peers},
            **{f"llama_cpp_{g}": (lambda g=g: llama[g](prompt, n)) for g in llama},
            "bandwidth": read_probe(probe, kernel=True), "matmul": matmul_probe(torch.float32, mm)}
    times, outs = {k: [] for k in runs}, {}
    with torch.inference_mode():
        for d in ours: run_ours(d, 4)  # warm-up: first calls allocate and pick kernels
        for d in peers: run_peer(d, 4)
        for g in llama: llama[g](prompt, 4)
        runs["bandwidth"](); runs["matmul"]()
        for r in range(args.rounds):
            for name, f in runs.items():
                best = float("inf")
                for _ in range(PROBE_REPEATS if name in ("bandwidth", "matmul") else 1):
                    t0 = time.perf_counter()
                    outs[name] = f()
                    best = min(best, time.perf_counter() - t0)
                times[name].append(best)
            log(f"{shape} threads {threads} round {r + 1}: " + ", ".join(
                f"{k} {n / v[-1]:.1f} tok/s" for k, v in times.items() if k not in ("bandwidth", "matmul"))
                + f", bandwidth {probe / times['bandwidth'][-1] / 1e9:.1f} GB/s, "
                  f"fp32 {2 * mm**3 / times['matmul'][-1] / 1e9:.0f} GFLOP/s")
    med = statistics.median
    bw = [probe / t for t in times["bandwidth"]]
    flops = [2 * mm**3 / t for t in times["matmul"]]
    res = {"model": shape, "threads": threads, "bandwidth_gb_s": round(med(bw) / 1e9, 2),
           "fp32_gflop_s": round(med(flops) / 1e9, 1)}
    for d in peers: res[f"transformers_{d}_tokens_per_s"] = round(n / med(times[f"transformers_{d}"]), 2)
    for g in llama:
        res[f"llama_cpp_{g}_tokens_per_s"] = round(n / med(times[f"llama_cpp_{g}"]), 2)
        assert len(outs[f"llama_cpp_{g}"]) == n, f"llama.cpp made {len(outs[f'llama_cpp_{g}'])} tokens, not {n}"
        if "float32" in ours:  # each format against our float32 too: f16 and q8_0 round otherwise than ours
            same = [a == b for a, b in zip(outs["float32"][0, T0:].tolist(), outs[f"llama_cpp_{g}"])]
            res[f"llama_cpp_{g}_same_greedy_tokens_as_fp32"] = round(sum(same) / n, 3)
        llama[g].llm.close()
    if problem: res["llama_cpp_problem"] = problem
    for d, model in ours.items():
        per_token = weight_bytes(model) + kv_cache_bytes(model, T0 + n // 2)  # the weights, and the cache at the mean position
        flop = 2 * sum(p.numel() for name, p in model.named_parameters() if name.endswith(".weight") and p.dim() > 1
                       and "emb" not in name)  # two per weight of every matrix multiplied
        roof = [min(b / per_token, f / flop) for b, f in zip(bw, flops)]  # tokens/s at the lower roof, per round
        speed = [n / t for t in times[d]]
        r = {"tokens_per_s": round(med(speed), 2), "mb_per_token": round(per_token / 1e6, 2),
             "bandwidth_roof_tokens_per_s": round(med(b / per_token for b in bw), 1),
             "compute_roof_tokens_per_s": round(med(f / flop for f in flops), 1),
             "roof_fraction": round(med(s / x for s, x in zip(speed, roof)), 3)}
        for p in peers:
            r[f"ratio_to_transformers_{p}"] = round(med(a / b for a, b in zip(times[f"transformers_{p}"], times[d])), 3)
        if d != "float32" and "float32" in ours:
            r["same_greedy_tokens_as_fp32"] = round((outs[d] == outs["float32"])[:, T0:].float().mean().item(), 3)
        if GGUF_FOR.get(d) in llama:  # llama.cpp in the matching format
            g = GGUF_FOR[d]
            r["llama_cpp_format"] = g
            r["ratio_to_llama_cpp"] = round(med(a / b for a, b in zip(times[f"llama_cpp_{g}"], times[d])), 3)
            same = [a == b for a, b in zip(outs[d][0, T0:].tolist(), outs[f"llama_cpp_{g}"])]
            r["same_greedy_tokens_as_llama_cpp"] = round(sum(same) / n, 3)
            r["llama_cpp_same_until"] = same.index(False) if False in same else n  # tokens before the first difference
        res[d] = r
    if "float32" in ours and "float32" in peers:
        res["fp32_tokens_equal_transformers"] = bool(torch.equal(outs["float32"], outs["transformers_float32"]))
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="gpt2,recipe", help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--threads", default="default,1", help="comma-separated thread counts; 'default' is torch's")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (medians over them)")
    ap.add_argument("--dtypes", default="float32,bfloat16,int8", help="our variants, comma-separated")
    ap.add_argument("--peer-dtypes", default="float32,bfloat16", help="transformers' variants, comma-separated")
    ap.add_argument("--llama-cpp", default="f32,f16,q8_0", metavar="FORMATS",
                    help="llama.cpp's GGUF formats, comma-separated (f32 against our float32, f16 against bfloat16, "
                         "q8_0 against int8); '' leaves llama.cpp out")
    ap.add_argument("--gguf-dir", help="where to write the GGUF files (default: a temporary directory, removed after)")
    ap.add_argument("--note", default="", help="a remark stored with each line (such as the machine's load)")
    ap.add_argument("--out", help="also append the JSON lines to this file")
    args = ap.parse_args()
    formats = [g for g in args.llama_cpp.split(",") if g]
    if bad := [g for g in formats if g not in GGUF_FOR.values()]:
        fail(f"--llama-cpp takes {', '.join(GGUF_FOR.values())}, not {', '.join(bad)}")
    if formats:
        try: import llama_cpp
        except ImportError: fail(NO_LLAMA_CPP)
        llama_version = llama_cpp.__version__
    with tempfile.TemporaryDirectory() as tmp:
        if args.gguf_dir: os.makedirs(args.gguf_dir, exist_ok=True)
        run_all(args, formats, args.gguf_dir or tmp, llama_version if formats else None)


def run_all(args, formats, gguf_dir, llama_version):
    "Every model shape and thread count of `args`: their JSON lines, printed and appended to `args.out`."
    default = torch.get_num_threads()
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")  # names this run's lines
    counts = [default if t == "default" else int(t) for t in args.threads.split(",")]
    from nanogpt_plus.fastgen import decode_kernels
    from nanogpt_plus.formats import ExportError
    k = decode_kernels()
    for shape in args.models.split(","):
        ours, peers, ref = build(shape, [d for d in args.dtypes.split(",") if d], [d for d in args.peer_dtypes.split(",") if d])
        ggufs, problem = {}, None
        try: ggufs = export_ggufs(ref, gguf_dir, formats) if formats else {}
        except ExportError as e: problem = f"no GGUF file of this shape: {e}"; log(problem)
        for threads in counts:
            res = measure(shape, threads, ours, peers, args, ggufs)
            if problem: res["llama_cpp_problem"] = problem
            if formats: res["llama_cpp_version"] = llama_version
            res.update(default_threads=threads == default, cpus=os.cpu_count(), new_tokens=args.new_tokens,
                       prompt_tokens=args.prompt_tokens, rounds=args.rounds, torch=torch.__version__,
                       kernels="C, OpenMP" if k.openmp else ("C, one thread" if k.matvec else f"PyTorch ({k.problem})"),
                       load_1min_after=round(os.getloadavg()[0], 1), note=args.note, started=started,
                       date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
            line = json.dumps(res)
            print(line, flush=True)
            if args.out:
                with open(args.out, "a") as f: f.write(line + "\n")


if __name__ == "__main__":
    main()

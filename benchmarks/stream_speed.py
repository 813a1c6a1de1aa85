"""Streaming generation against the batch path: the time and memory of printing 100,000 tokens as they come.

Before chapter 9's `TextStream`, `generate --num-samples 1` decoded every token so far at every step (quadratic: 16,000
tokens took 29.5 s, 100,000 did not finish in two minutes). Now it decodes only what is new. This script generates
the same tokens two ways in one process, in alternating rounds (median): streamed, as `nanogpt-plus generate` prints
one sample, and in one batch decoded at the end. It also reads the resident memory of the process after 10% and
after 100% of the streamed tokens: flat memory means the second is not larger.

usage: python benchmarks/stream_speed.py [--tokens 100000] [--rounds 2]   (prints one JSON line)
"""
import argparse
import io
import json
import statistics
import time

import torch

from nanogpt_plus.bigram import generate, stream
from nanogpt_plus.data import tiny_shakespeare
from nanogpt_plus.generate import TextStream, to_decode_layout
from nanogpt_plus.gpt import GPT, GPTConfig
from nanogpt_plus.tokenizer import CharTokenizer


def rss_mib() -> float:
    with open("/proc/self/statm") as f: return int(f.read().split()[1]) * 4096 / 2**20


def streamed(model, tok, idx, n, opts):
    out, text, marks = io.StringIO(), TextStream(tok), {}
    for i, nxt in enumerate(stream(model, idx, n, generator=torch.Generator().manual_seed(0), **opts)):
        out.write(text.add(nxt[0].tolist()))
        if i + 1 in (n // 10, n): marks[i + 1] = rss_mib()
    out.write(text.flush())
    return out.getvalue(), marks


def batched(model, tok, idx, n, opts):
    return tok.decode(generate(model, idx, n, generator=torch.Generator().manual_seed(0), **opts)[0, 1:].tolist())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=100_000)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    text = tiny_shakespeare()
    tok = CharTokenizer(text)
    torch.manual_seed(0)
    model = to_decode_layout(GPT(GPTConfig.from_name("small", vocab_size=tok.vocab_size)).eval())
    idx = torch.tensor([tok.encode("\n")])
    opts = dict(temperature=0.8, use_kv_cache=True, overflow="half")  # cheap steps: the printing shows more
    times, memory = {"stream": [], "batch": []}, None
    for _ in range(args.rounds):
        start = time.perf_counter()
        s, memory = streamed(model, tok, idx, args.tokens, opts)
        times["stream"].append(time.perf_counter() - start)
        start = time.perf_counter()
        b = batched(model, tok, idx, args.tokens, opts)
        times["batch"].append(time.perf_counter() - start)
        assert s == b, "the streamed text differs from the batch text"
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"tokens": args.tokens, "rounds": args.rounds, "stream_s": round(med["stream"], 2),
                      "batch_s": round(med["batch"], 2), "stream_over_batch": round(med["stream"] / med["batch"], 3),
                      "rss_mib_at_10pct": round(memory[args.tokens // 10], 1),
                      "rss_mib_at_100pct": round(memory[args.tokens], 1), "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()

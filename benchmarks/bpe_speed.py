"""Byte-pair encoding speed: training time, and encoding throughput of the teaching path against tiktoken.

Trains a `BPETokenizer` of `--vocab-size` tokens (default 4,096) on tiny-shakespeare (or `--text FILE`; chapter 02b),
then encodes the same text with

- the teaching path: `BPETokenizer.encode`, the chapter's Python encoder (a fresh tokenizer each round, so its chunk
  cache starts empty, as on a first pass over a corpus);
- the fast path: `BPETokenizer.to_tiktoken()`, the same merges run by tiktoken's Rust code (one thread).

The two must give the same tokens: the script checks it, so both sides provably do the same work. The same is done
for GPT-2's own merges (`BPETokenizer.from_gpt2()` against tiktoken's `gpt2`). Encoders are timed in alternating
rounds, so that load from other processes hits both alike; the median round counts. Training is timed over
`--train-rounds` runs (median). Prints one JSON line.

    python benchmarks/bpe_speed.py [--vocab-size 4096] [--rounds 5] [--train-rounds 3] [--no-gpt2] [--text FILE]
"""
import argparse
import json
import platform
import statistics
import time

import tiktoken

from nanogpt_plus.bpe import BPETokenizer
from nanogpt_plus.data import load_text, tiny_shakespeare


def seconds(fn):
    "Wall time of one call of `fn`, and its result."
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def compare(text, teaching, fast, rounds):
    """Median encoding time of `text` for `teaching()` and `fast()` (each makes a fresh encode function, untimed),
    in alternating rounds; checks that both give the same ids."""
    ours, theirs = [], []
    for _ in range(rounds):
        encode = teaching()
        t, ids_ours = seconds(lambda: encode(text))
        ours.append(t)
        encode = fast()
        t, ids_fast = seconds(lambda: encode(text))
        theirs.append(t)
        if ids_ours != ids_fast: raise AssertionError("the teaching path and tiktoken disagree")
    mb = len(text.encode("utf-8")) / 1e6
    return {"teaching_mb_per_s": round(mb / statistics.median(ours), 2),
            "fast_mb_per_s": round(mb / statistics.median(theirs), 2),
            "teaching_tokens_per_s": round(len(ids_ours) / statistics.median(ours)),
            "fast_tokens_per_s": round(len(ids_fast) / statistics.median(theirs)),
            "speedup": round(statistics.median(ours) / statistics.median(theirs), 2), "tokens": len(ids_ours)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=5, help="alternating encoding rounds per path")
    p.add_argument("--train-rounds", type=int, default=3)
    p.add_argument("--no-gpt2", action="store_true", help="skip the comparison with GPT-2's merges")
    p.add_argument("--text", help="a UTF-8 text file to train on and encode (default: tiny-shakespeare)")
    args = p.parse_args(argv)
    text = load_text(args.text) if args.text else tiny_shakespeare()

    train_times = []
    for _ in range(args.train_rounds):
        t, tok = seconds(lambda: BPETokenizer.train(text, args.vocab_size))
        train_times.append(t)

    def teaching(): return BPETokenizer(tok.merges, list(tok.special_tokens), tok.pattern, tok.byte_ids).encode

    def fast():
        enc = tok.to_tiktoken()
        return lambda s: enc.encode(s, allowed_special="all")

    result = {"benchmark": "bpe_speed", "text_mb": round(len(text.encode("utf-8")) / 1e6, 3),
              "vocab_size": tok.vocab_size, "train_s": round(statistics.median(train_times), 3),
              "train_rounds_s": [round(t, 3) for t in train_times], **compare(text, teaching, fast, args.rounds)}
    if not args.no_gpt2:
        gpt2_ref = tiktoken.get_encoding("gpt2")
        load_s, gpt2 = seconds(BPETokenizer.from_gpt2)

        def gpt2_teaching(): return BPETokenizer(gpt2.merges, list(gpt2.special_tokens), gpt2.pattern, gpt2.byte_ids).encode

        def gpt2_fast(): return lambda s: gpt2_ref.encode(s, allowed_special="all")

        result["gpt2"] = {"load_merges_s": round(load_s, 3), **compare(text, gpt2_teaching, gpt2_fast, args.rounds)}
    result.update(tiktoken=tiktoken.__version__, python=platform.python_version(),
                  machine=platform.processor() or platform.machine())
    print(json.dumps(result))


if __name__ == "__main__":
    main()

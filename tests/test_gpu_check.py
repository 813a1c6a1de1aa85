"""`tools/gpu_check.sh` at CPU size (`SMOKE=1`): every part runs to the end and leaves its JSON line, and the tests
marked `cuda` skip saying why. On a GPU machine the same script measures for real."""
import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.long  # minutes: `pytest -m long tests` runs it, CI leaves it out
def test_gpu_check_runs_its_parts_at_cpu_size(tmp_path):
    env = dict(os.environ, SMOKE="1", OUT=str(tmp_path), OMP_NUM_THREADS="1")
    done = subprocess.run(["bash", "tools/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    kinds = [line.get("benchmark") or line.get("recipe") or line.get("gpu_check") for line in lines]
    assert kinds == ["gpu_train", "speedrun-5e13", "gpu_generate", "done"]
    assert lines[-1]["failed_parts"] == [] and lines[-1]["device"] == "cpu"
    assert lines[0]["tokens_per_s"]["ours"] > 0 and lines[0]["matmul_peak_tflops"] > 0
    assert lines[2]["float32"]["tokens_per_s"] > 0 and lines[2]["copy_bandwidth_gbs"] > 0
    log = (tmp_path / "gpu_check.log").read_text()
    assert "needs a CUDA GPU" in log and " passed" not in log.split("== cuda_tests")[1].split("== train")[0]

"""pytest set-up shared by tests/ and the nbval run over nbs/."""
import os

# OpenMP threads that wait by spinning burn the core a busy neighbour needs: with another CPU-bound process beside
# it, a chapter's training cell ran many times slower. Passive waiting gives the same results (the same threads do
# the same work) and was about twice as fast here, idle or loaded. Set before torch loads OpenMP; the notebooks'
# kernels inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def pytest_collection_modifyitems(items):
    # Tests marked `cuda` need a GPU: without one they are skipped, and the skip says why and where they do run.
    cuda = [item for item in items if item.get_closest_marker("cuda")]
    if cuda:
        import pytest
        import torch
        if not torch.cuda.is_available():
            skip = pytest.mark.skip(reason="needs a CUDA GPU (none here): tools/gpu_check.sh runs it on a GPU machine")
            for item in cuda: item.add_marker(skip)
    # nbdev-clean blanks every execution_count, and nbval reads a blank count as "this reference cell was never
    # run" and refuses to compare it. Our notebooks are always saved after a full run, so give each cell a count.
    for item in items:
        cell = getattr(item, "cell", None)
        if cell is not None and getattr(cell, "cell_type", None) == "code" and cell.get("execution_count") is None:
            cell["execution_count"] = 1

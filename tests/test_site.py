"""The rendered book, checked in a real browser: render the site offline (nbdev-proc-nbs + smalldocs) and open
every chapter page in headless Chromium (tools/check_site.py says what it checks)."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("check_site", ROOT / "tools" / "check_site.py")
check_site = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_site)


def test_pages_promise_titles():
    "Every notebook has a `# Title` and a `> description` (the front matter the site shows); needs no browser."
    pages = check_site.notebook_pages(ROOT / "nbs")
    assert "index" in pages and len(pages) > 1
    for name, page in pages.items():
        assert page["title"], f"{name}: no `# Title` in the first markdown cell"
        assert page["description"], f"{name}: no `> description` under the title"


def test_check_page_finds_problems():
    "The page checks fail on what they are meant to catch (so a passing site check means something)."
    want = dict(title="Tiny Shakespeare", description="The `text`.", n_images=1)
    good = dict(title="Tiny Shakespeare – nanogpt_plus", h1="Tiny Shakespeare", description="The text.",
                images=[dict(src="data:image/png", width=640, output=True)], outputs=["65 characters"], text="")
    assert check_site.check_page(good, want) == []
    bad = dict(good, h1="01_eda", images=[dict(src="data:image/png", width=0, output=True)],
               outputs=["Traceback (most recent call last):\n  ...", "\x1b[0;31mValueError",
                        "/x.py:3: UserWarning: careful"])
    found = "\n".join(check_site.check_page(bad, want))
    for what in ("title is '01_eda'", "did not load", "shows 0 plot(s)", "Traceback", "\\x1b[", "UserWarning"):
        assert what in found, (what, found)


@pytest.mark.skipif(not check_site.find_browser(),
                    reason="Chromium is not installed (Debian: apt-get install chromium; or set CHROME=/path/to/it)")
def test_site_renders_and_every_page_checks_out(tmp_path):
    "Set SITE_SCREENSHOTS=DIR to keep the screenshots (one PNG per page) for a look."
    shots = Path(os.environ.get("SITE_SCREENSHOTS") or tmp_path)
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "check_site.py"), "--screenshots", str(shots)],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"site check failed:\n{r.stdout[-6000:]}\n{r.stderr[-6000:]}"
    assert (shots / "index.png").stat().st_size > 10_000  # a screenshot of a real page, not a blank one


def test_home_page_teaser_is_a_real_output():
    "The sample quoted on the home page ('A taste') is the stored output of a chapter, not something typed in."
    import json, re
    index = "".join("".join(c["source"]) for c in json.loads((ROOT / "nbs" / "index.ipynb").read_text())["cells"])
    taste = index.split("## A taste", 1)[1].split("\n## ", 1)[0] if "## A taste" in index else ""
    quotes = re.findall(r"```text\n(.*?)```", taste, re.S)
    assert quotes, "the home page lost its teaser (a ```text block under '## A taste')"
    outputs = [("".join(o.get("text", "")) or "".join(o.get("data", {}).get("text/plain", "")))
               for nb in sorted((ROOT / "nbs").glob("[0-9]*.ipynb"))
               for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    for q in quotes:
        assert any(q.strip() in o for o in outputs), f"teaser not found in any chapter's stored outputs:\n{q}"


def test_every_chapter_opens_in_colab():
    """Each chapter has an 'Open in Colab' badge for itself and, before anything imports the package, a cell that
    installs it on Colab (see CONTRIBUTING.md)."""
    import json
    missing = []
    for nb_path in sorted((ROOT / "nbs").glob("[0-9]*.ipynb")):
        cells = json.loads(nb_path.read_text())["cells"]
        srcs = ["".join(c["source"]) for c in cells]
        url = f"colab.research.google.com/github/nanogpt-plus/nanogpt_plus/blob/main/nbs/{nb_path.name}"
        badge = any(c["cell_type"] == "markdown" and url in s for c, s in zip(cells, srcs))
        install = next((i for i, s in enumerate(srcs) if '"google.colab" in sys.modules' in s), None)
        first_use = next((i for i, s in enumerate(srcs) if "nanogpt_plus" in s and "import" in s
                          and cells[i]["cell_type"] == "code"), len(srcs))
        if not badge: missing.append(f"{nb_path.name}: no Colab badge linking to itself")
        if install is None or install > first_use:
            missing.append(f"{nb_path.name}: no Colab install cell before the first `import nanogpt_plus...`")
    assert not missing, "\n".join(missing) + "\n(copy the badge and install cell of nbs/01_eda.ipynb)"

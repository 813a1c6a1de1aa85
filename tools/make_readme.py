"""Write README.md from nbs/index.ipynb (nbdev-readme needs Quarto, which not every machine has).

usage: python tools/make_readme.py          # write README.md
       python tools/make_readme.py --check  # exit 1 if README.md is out of date
"""
import json, re, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTE = "<!-- Generated from nbs/index.ipynb by tools/make_readme.py: edit the notebook, not this file. -->\n\n"


def cell_markdown(cell) -> str:
    src = "".join(cell["source"])
    if cell["cell_type"] == "markdown":
        return re.sub(r"\]\((\d\d[a-z]?_\w+\.ipynb)\)", r"](nbs/\1)", src)  # chapter links point into nbs/
    if cell["cell_type"] != "code" or src.lstrip().startswith("#| hide"): return ""
    code = "\n".join(l for l in src.splitlines() if not l.startswith("#|"))
    outs = [("".join(o["text"]) if "text" in o else "".join(o.get("data", {}).get("text/plain", "")))
            for o in cell.get("outputs", []) if o.get("output_type") != "display_data"]
    shown = f"```python\n{code}\n```"
    return shown + "".join(f"\n\n```\n{o.rstrip()}\n```" for o in outs if o.strip())


def readme() -> str:
    nb = json.loads((ROOT / "nbs" / "index.ipynb").read_text())
    parts = [p for p in map(cell_markdown, nb["cells"]) if p.strip()]
    return NOTE + "\n\n".join(parts).strip() + "\n"


if __name__ == "__main__":
    text, path = readme(), ROOT / "README.md"
    if "--check" in sys.argv:
        if not path.exists() or path.read_text() != text:
            sys.exit("README.md is out of date: run `python tools/make_readme.py`")
    else: path.write_text(text)

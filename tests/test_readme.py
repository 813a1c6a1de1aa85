"README.md is generated from nbs/index.ipynb, and CI runs exactly the commands the README gives readers."
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_readme(root: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(root / "tools" / "make_readme.py"), *args], cwd=root,
                          capture_output=True, text=True)


def test_readme_is_in_sync_with_index():
    r = make_readme(ROOT, "--check")
    assert r.returncode == 0, r.stderr + r.stdout


def test_the_check_notices_drift(tmp_path):
    "The sync check fails on a README edited by hand, and passes again once it is regenerated."
    (tmp_path / "tools").mkdir(); (tmp_path / "nbs").mkdir()
    shutil.copy(ROOT / "tools" / "make_readme.py", tmp_path / "tools")
    shutil.copy(ROOT / "nbs" / "index.ipynb", tmp_path / "nbs")
    (tmp_path / "README.md").write_text((ROOT / "README.md").read_text().replace("chapter", "chapitre", 1))
    r = make_readme(tmp_path, "--check")
    assert r.returncode == 1 and "out of date" in r.stderr
    assert make_readme(tmp_path).returncode == 0 and make_readme(tmp_path, "--check").returncode == 0


def readme_commands() -> dict[str, str]:
    "The README's shell blocks, keyed by the start of the paragraph just before each."
    found, intro = {}, ""
    for part in re.split(r"(```sh\n.*?```)", (ROOT / "README.md").read_text(), flags=re.S):
        if part.startswith("```sh"): found[intro] = part[len("```sh"):-3].strip()
        else: intro = re.sub(r"\s+", " ", part.strip().split("\n\n")[-1])[:40]
    return found


def test_ci_runs_the_readme_commands_verbatim():
    cmds = readme_commands()
    setup = next((c for k, c in cmds.items() if k.startswith("Set up")), None)
    tests = next((c for k, c in cmds.items() if k.startswith("Run every test")), None)
    assert setup and tests, f"README lost its 'Set up' or 'Run every test' command block: {cmds}"
    ci = [l.strip() for l in (ROOT / ".ci" / "run").read_text().splitlines()]
    for what, cmd in (("set-up", setup), ("test", tests)):
        for line in cmd.splitlines():
            assert line.strip() in ci, f"the README's {what} command `{line}` is not a line of .ci/run"

"""Render the book offline and check every chapter page in headless Chromium.

Quarto cannot be installed everywhere, so this renders the site the way `nbdev-docs` would, minus Quarto:
`nbdev-proc-nbs` (nbdev's notebook processing, into `_proc/`) then `smalldocs render _proc` (a pure-Python
renderer that reads `_quarto.yml`; the site lands in `_proc/_docs/`). It then serves the site on localhost, opens
every page that has a notebook in `nbs/` in headless Chromium (driven over the DevTools protocol) and checks that:

- the page loads, and shows the title and the one-line description of its notebook's first markdown cell;
- every image on the page from the site itself (plots are data URIs) loads, with a width above zero, and the page
  shows at least as many plots as its notebook has stored image outputs (badges from other hosts are skipped:
  they cannot load offline);
- no cell output shows a traceback, ANSI colour codes or a Python warning;
- the sidebar lists every notebook by its title (a chapter number before it and a shortened title are fine), and
  no link inside the site points to a missing page;
- every cross-link that nbdev makes from a name in backticks lands on a `show_doc` section of the page it names.

usage: python tools/check_site.py                      # render, then check every page
       python tools/check_site.py --screenshots shots  # also save a PNG of the top of each page to shots/
       python tools/check_site.py --no-render          # check the site already in _proc/_docs
Exit status 0 when every check passes, 1 when one fails (each failure is printed), 2 when it cannot run.
Chromium: `chromium` on PATH, or the `CHROME` environment variable (Debian: `apt-get install chromium`).
"""
from __future__ import annotations

import argparse
import base64
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")

# What an error looks like once rendered: a Python traceback, IPython's banner, or ANSI colour codes that leaked.
TRACEBACK = re.compile(r"Traceback \(most recent call last\)|^-{20,}\n\w+(Error|Exception)\b|\x1b\[|\[0;3\dm|\[1;3\dm",
                       re.M)
WARNING = re.compile(r"\b[A-Z]\w*Warning: ")

# nbdev-proc-nbs runs this, but first offers to install Quarto with sudo when it is missing; we only need the
# notebook processing, so the same function runs with that step switched off.
PROC_NBS = "import nbdev.quarto as q; q._ensure_quarto = lambda: None; q._pre_docs()"


def find_browser() -> str | None:
    "The Chromium executable: `$CHROME`, else the first of the usual names on PATH."
    if os.environ.get("CHROME"): return shutil.which(os.environ["CHROME"])
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


# ---------------------------------------------------------------------------------------------------------------
# What each notebook promises
def notebook_pages(nbs: Path) -> dict[str, dict]:
    "For every notebook in `nbs`: its page name, title, description and number of visible image outputs."
    pages = {}
    for nb_path in sorted(nbs.glob("*.ipynb")):
        if nb_path.name.startswith(("_", ".")): continue
        nb = json.loads(nb_path.read_text())
        title = description = ""
        md = next((c for c in nb["cells"] if c["cell_type"] == "markdown"), None)
        if md is not None:
            src = "".join(md["source"])
            if m := re.search(r"^#\s+(.+)$", src, re.M): title = m.group(1).strip()
            if m := re.search(r"^>\s*(.+)$", src, re.M): description = m.group(1).strip()
        n_images = 0
        for c in nb["cells"]:
            if c["cell_type"] != "code": continue
            directives = re.findall(r"^#\|\s*([\w-]+)(?::\s*(\S+))?", "".join(c["source"]), re.M)
            d = {k: v.lower() for k, v in directives}
            if "hide" in d or d.get("output") == "false" or d.get("include") == "false" or "hide_output" in d:
                continue
            n_images += sum(1 for o in c.get("outputs", []) if any(k.startswith("image/") for k in o.get("data", {})))
        html = "index.html" if nb_path.stem == "index" else nb_path.stem + ".html"
        pages[nb_path.stem] = dict(notebook=nb_path.name, html=html, title=title, description=description,
                                   n_images=n_images)
    return pages


def mixed_import_cells(nb_path: Path) -> list[str]:
    "Cells that nbdev's doc build runs on their own (they import) but that also use names from other cells."
    import ast
    nb, found = json.loads(nb_path.read_text()), []
    for i, c in enumerate(nb["cells"]):
        src = "".join(c["source"])
        if c["cell_type"] != "code" or re.search(r"^#\|\s*export", src, re.M): continue
        try: tree = ast.parse("\n".join(l for l in src.splitlines() if not l.lstrip().startswith(("%", "!"))))
        except SyntaxError: continue
        top = tree.body
        if (any(isinstance(t, (ast.Import, ast.ImportFrom)) for t in top)
                and any(isinstance(t, (ast.Expr, ast.Assign)) for t in top)):
            first = next(l for l in src.splitlines() if l.strip() and not l.startswith("#|"))
            found.append(f"{nb_path.name} cell {i}: {first[:70]}")
    return found


# ---------------------------------------------------------------------------------------------------------------
# Rendering
def render(root: Path) -> Path:
    "Process the notebooks like `nbdev-proc-nbs`, render them with smalldocs, and return the site folder."
    t = time.time()
    r = subprocess.run([sys.executable, "-c", PROC_NBS], cwd=root, capture_output=True, text=True)
    if r.returncode:
        mixed = [m for p in sorted((root / "nbs").glob("*.ipynb")) for m in mixed_import_cells(p)]
        hint = ("\nnbdev's doc build runs every cell that imports something in a fresh kernel, without the cells "
                "before it (so that show_doc has its names). Put imports in a cell of their own (or in an "
                "`#| export` cell). Cells that mix imports with other code:\n  " + "\n  ".join(mixed)) if mixed else ""
        errors = [l for l in r.stderr.splitlines() if re.match(r"\w*(Exception|Error)\b", l)]
        raise RuntimeError(f"nbdev-proc-nbs failed (exit {r.returncode}):\n" + "\n".join(r.stderr.splitlines()[-25:])
                           + ("\n\nerrors: " + "\n".join(errors) if errors else "") + hint)
    print(f"nbdev-proc-nbs: {time.time() - t:.1f} s", flush=True)
    t = time.time()
    r = subprocess.run(["smalldocs", "render", "--quiet", "_proc"], cwd=root, capture_output=True, text=True)
    if r.returncode: raise RuntimeError(f"smalldocs render failed (exit {r.returncode}):\n{r.stdout}{r.stderr}")
    print(f"smalldocs render: {time.time() - t:.1f} s", flush=True)
    return root / "_proc" / "_docs"


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args): pass


@contextmanager
def serve(site: Path):
    "Serve `site` on a free localhost port; yields the base URL."
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try: yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally: server.shutdown(); server.server_close()


# ---------------------------------------------------------------------------------------------------------------
# A small DevTools-protocol client: one headless Chromium, one tab
class Chromium:
    "Headless Chromium driven over the DevTools protocol (websocket-client), one page at a time."

    def __init__(self, executable: str, width: int = 1280, height: int = 900, timeout: float = 60):
        import websocket  # websocket-client
        self.timeout, self._id, self.events = timeout, 0, []
        self.profile = tempfile.mkdtemp(prefix="check_site_chromium_")
        args = [executable, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-extensions", "--disable-dev-shm-usage",
                # offline and repeatable: every host but this machine fails at once (CDN scripts, badges)
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--hide-scrollbars", "--mute-audio",
                f"--user-data-dir={self.profile}", "--remote-debugging-port=0", "--remote-allow-origins=*",
                f"--window-size={width},{height}", "about:blank"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        port_file, deadline = Path(self.profile) / "DevToolsActivePort", time.time() + timeout
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode()[-2000:]
                raise RuntimeError(f"chromium exited with {self.proc.returncode}: {err}")
            if time.time() > deadline: self.close(); raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=timeout) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=timeout, suppress_origin=True)
        self.send("Page.enable")
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def send(self, method: str, **params) -> dict:
        "Call a DevTools method and wait for its result; events that arrive meanwhile are kept in `events`."
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self._id:
                if "error" in msg: raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg: self.events.append(msg)

    def wait_event(self, name: str):
        "Wait for the DevTools event `name`."
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            for i, e in enumerate(self.events):
                if e["method"] == name: return self.events.pop(i)
            msg = json.loads(self.ws.recv())
            if "method" in msg: self.events.append(msg)
        raise TimeoutError(f"no {name} within {self.timeout} s")

    def goto(self, url: str):
        "Open `url` and wait until the page has loaded."
        self.events.clear()
        res = self.send("Page.navigate", url=url)
        if res.get("errorText"): raise RuntimeError(f"could not open {url}: {res['errorText']}")
        self.wait_event("Page.loadEventFired")

    def evaluate(self, js: str):
        "The JSON value of the JavaScript expression `js` (promises are awaited)."
        res = self.send("Runtime.evaluate", expression=js, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in res: raise RuntimeError(f"javascript failed: {res['exceptionDetails']}")
        return res["result"].get("value")

    def screenshot(self, path: Path, full: bool = False, max_height: int = 16000):
        "Save a PNG of the viewport, or of the whole page (up to `max_height` pixels) when `full`."
        params = dict(format="png")
        if full:
            w, h = self.evaluate("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
            params.update(captureBeyondViewport=True, clip=dict(x=0, y=0, width=w, height=min(h, max_height), scale=1))
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", **params)["data"]))

    def close(self):
        try: self.ws.close()
        except Exception: pass
        self.proc.terminate()
        try: self.proc.wait(10)
        except subprocess.TimeoutExpired: self.proc.kill(); self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


# Everything the checks need from a page, gathered in the browser once the images have settled.
PAGE_JS = r"""
(async () => {
  const imgs = [...document.images];
  await Promise.all(imgs.map(i => i.complete ? null :
    new Promise(r => { i.addEventListener('load', r); i.addEventListener('error', r); setTimeout(r, 10000); })));
  const local = i => i.src.startsWith('data:') || new URL(i.src, location.href).origin === location.origin;
  const main = document.querySelector('main') || document.body;
  const text = e => (e ? e.innerText || '' : '').trim();
  return {
    title: document.title,
    h1: text(document.querySelector('main h1.title') || document.querySelector('main h1')),
    description: text(document.querySelector('main .description')),
    images: imgs.filter(local).map(i => ({src: i.src.slice(0, 60), width: i.naturalWidth,
                                          output: !!i.closest('.cell-output, .cell-output-display')})),
    external_images: imgs.filter(i => !local(i)).map(i => i.src),
    outputs: [...main.querySelectorAll('.cell-output')].map(e => e.innerText),
    text: main.innerText,
    sidebar: [...document.querySelectorAll('#quarto-sidebar a.sidebar-link')]
               .map(a => [text(a), a.getAttribute('href')]),
    links: [...document.querySelectorAll('a[href]')].map(a => a.href),
    ids: [...main.querySelectorAll('[id]')].map(e => e.id),
  };
})()
"""


def plain(md: str) -> str:
    "Markdown as the reader sees it, for comparisons: no code ticks or emphasis marks, straight quotes."
    quotes = {"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'}
    return re.sub(r"[`*_]", "", md).translate(str.maketrans(quotes)).strip()


def check_page(info: dict, want: dict) -> list[str]:
    "The problems of one rendered page, given what its notebook promises."
    problems = []
    if want["title"] and plain(info["h1"]) != plain(want["title"]):
        problems.append(f"title is {info['h1']!r}, the notebook says {want['title']!r}")
    if want["title"] and not plain(info["title"]).startswith(plain(want["title"])):
        problems.append(f"<title> is {info['title']!r}, expected it to start with {want['title']!r}")
    if not want["title"]: problems.append("the notebook has no `# Title` in its first markdown cell")
    if not want["description"]: problems.append("the notebook has no `> description` under its title")
    elif plain(info["description"]) != plain(want["description"]):
        problems.append(f"description is {info['description']!r}, the notebook says {want['description']!r}")
    broken = [i["src"] for i in info["images"] if not i["width"]]
    if broken: problems.append(f"{len(broken)} image(s) did not load: {broken}")
    shown = sum(1 for i in info["images"] if i["output"] and i["width"])
    if shown < want["n_images"]:
        problems.append(f"shows {shown} plot(s), its notebook has {want['n_images']} image output(s)")
    for out in info["outputs"]:
        if m := TRACEBACK.search(out):
            problems.append(f"an output shows an error ({m.group(0)!r}): {out[:300]!r}")
        if m := WARNING.search(out):
            problems.append(f"an output shows a warning: {out[max(0, m.start() - 100):m.end() + 150]!r}")
    if "Traceback (most recent call last)" in info["text"] and not any("Traceback" in o for o in info["outputs"]):
        problems.append("the page text shows a traceback")
    return problems


def site_url_of(root: Path) -> str:
    "The published site's address, from nbs/nbdev.yml (`site-url`), or '' when it is not there."
    try: text = (root / "nbs" / "nbdev.yml").read_text()
    except OSError: return ""
    m = re.search(r"site-url:\s*[\"']?([^\"'\s]+)", text)
    return m.group(1).rstrip("/") + "/" if m else ""


def check_site(site: Path, pages: dict, browser: str, screenshots: Path | None = None, full: bool = False,
               only: list[str] | None = None) -> list[str]:
    "Open every page in Chromium and return the list of problems (empty when all is well)."
    problems, linked, sidebar_checked, ids, doc_links = [], {}, False, {}, {}
    site_url = site_url_of(site.parent.parent if site.parent.name == "_proc" else site)
    titles = {p["html"]: p["title"] for p in pages.values()}
    if screenshots: screenshots.mkdir(parents=True, exist_ok=True)
    with serve(site) as base:
        chrome = Chromium(browser)
        try:
            for name, want in pages.items():
                if only and name not in only: continue
                if not (site / want["html"]).exists():
                    problems.append(f"{want['notebook']}: no page {want['html']} in the rendered site"); continue
                t = time.time()
                chrome.goto(base + want["html"])
                info = chrome.evaluate(PAGE_JS)
                page_problems = check_page(info, want)
                for text, href in info["sidebar"]:
                    target = (href or "").split("#")[0].split("/")[-1]
                    # "4. Attention" or "9. Generation" for "Generation: sampling and ...": the title or its start
                    shown = plain(re.sub(r"^\d+[a-z]?\.\s+", "", text))
                    title = titles.get(target) if target != "index.html" else None  # "Start here" is fine
                    if title and not (shown and plain(title).startswith(shown)):
                        page_problems.append(f"sidebar names {target} {text!r}, its title is {titles[target]!r}")
                ids[want["html"]] = set(info["ids"])
                for link in info["links"]:
                    if site_url and link.startswith(site_url):  # nbdev's cross-links point at the published site
                        doc_links.setdefault(link[len(site_url):].lstrip("/"), want["html"])
                    if not link.startswith(base): continue
                    path = urllib.parse.unquote(urllib.parse.urlsplit(link).path).lstrip("/") or "index.html"
                    linked.setdefault(path, want["html"])
                in_sidebar = {(h or "").split("#")[0].split("/")[-1] or "index.html" for _, h in info["sidebar"]}
                missing = sorted(set(titles) - in_sidebar)
                if missing and not sidebar_checked:
                    page_problems.append(f"the sidebar does not list {missing} (nbs/sidebar.yml)")
                sidebar_checked = True
                problems += [f"{want['html']}: {p}" for p in page_problems]
                if screenshots:
                    chrome.screenshot(screenshots / f"{name}.png")
                    if full: chrome.screenshot(screenshots / f"{name}-full.png", full=True)
                print(f"{want['html']:32} {'ok' if not page_problems else 'FAILED'}  "
                      f"({sum(1 for i in info['images'] if i['output'])} plots, {time.time() - t:.1f} s)", flush=True)
        finally:
            chrome.close()
    # Quarto names a chapter's page without its number (01_eda.ipynb -> eda.html); smalldocs keeps it.
    published = {re.sub(r"^\d+[a-zA-Z0-9]*_", "", html): html for html in ids}  # as nbdev names pages
    for link, source in sorted(doc_links.items() if not only else ()):
        page, _, anchor = link.partition("#")
        html = published.get(page or "index.html")
        if html is None: problems.append(f"{source}: cross-link to {link}, which is no page of the book")
        elif anchor and anchor not in ids[html]:
            problems.append(f"{source}: cross-link to {link}, but {html} has no #{anchor}: add show_doc for it there")
    for path, source in sorted(linked.items()):  # links inside the site (the sidebar, the chapter table)
        target = site / path
        if target.is_dir(): target = target / "index.html"
        if not target.exists(): problems.append(f"{source}: links to {path}, which is not in the site")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=ROOT, help="the project folder (default: this repository)")
    ap.add_argument("--no-render", action="store_true", help="check the site already rendered in _proc/_docs")
    ap.add_argument("--screenshots", type=Path, help="save a PNG of the top of each page in this folder")
    ap.add_argument("--full", action="store_true", help="with --screenshots, also save whole pages (NAME-full.png)")
    ap.add_argument("pages", nargs="*", help="notebook names to check (default: all, e.g. index 01_eda)")
    args = ap.parse_args(argv)
    start = time.time()
    browser = find_browser()
    if not browser:
        print("error: no Chromium found: install it (Debian: apt-get install chromium) or set CHROME", file=sys.stderr)
        return 2
    pages = notebook_pages(args.root / "nbs")
    try:
        site = args.root / "_proc" / "_docs" if args.no_render else render(args.root)
        problems = check_site(site, pages, browser, args.screenshots, args.full, args.pages or None)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for p in problems: print("FAIL", p)
    print(f"{len(pages) if not args.pages else len(args.pages)} page(s) checked in {time.time() - start:.0f} s: "
          f"{'all good' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

"""`nanogpt-plus serve` started for real in a subprocess on a loopback port, driven by the `openai` client and by
hostile requests; its greedy completions are compared with `nanogpt-plus generate --temperature 0`."""
import asyncio
import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from nanogpt_plus.checkpoint import save_checkpoint
from nanogpt_plus.gpt import GPT, GPTConfig
from nanogpt_plus.tokenizer import CharTokenizer

MISSING = [name for name in ("fastapi", "uvicorn", "openai", "httpx") if importlib.util.find_spec(name) is None]
if not MISSING:
    import httpx
    import openai

CORPUS = "First Citizen:\nBefore we proceed any further, hear me speak.\nAll:\nSpeak, speak.\n"
KEY = "test-key-123"
CONTEXT = 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    "A small random GPT (context 32) with a character tokenizer, saved as `train` saves one."
    if MISSING: pytest.skip(f"the server's tests need {', '.join(MISSING)}: pip install -e '.[serve,dev]'")
    root = tmp_path_factory.mktemp("serve") / "tiny"
    tok = CharTokenizer(CORPUS)
    torch.manual_seed(0)
    save_checkpoint(root, GPT(GPTConfig(vocab_size=tok.vocab_size, context_size=CONTEXT, n_layer=2, n_head=2, n_embd=32)), tok)
    return root


class Server:
    "A `nanogpt-plus serve` subprocess on a free loopback port, stopped at the end."
    def __init__(self, ckpt, *flags):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "nanogpt_plus", "serve", "--checkpoint", str(ckpt),
                                      "--port", str(self.port), *map(str, flags)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        deadline = time.time() + 90
        while True:
            assert self.proc.poll() is None, f"the server exited: {self.proc.stdout.read()}"
            assert time.time() < deadline, "the server did not answer /health within 90 s"
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200: break
            except httpx.HTTPError: time.sleep(0.2)
        self.banner = self.proc.stdout.readline()  # printed before the server listens

    def health(self) -> dict: return httpx.get(self.url + "/health", timeout=5).json()

    def wait_for(self, test, what: str, seconds: float = 120) -> dict:
        "Poll /health until `test(health)`, at most `seconds`."
        deadline = time.time() + seconds
        while not test(h := self.health()):
            assert time.time() < deadline, f"{what} not seen in {seconds} s: {h}"
            time.sleep(0.05)
        return h

    def stop(self):
        self.proc.terminate()
        try: self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired: self.proc.kill()


@pytest.fixture(scope="module")
def server(ckpt):
    s = Server(ckpt, "--api-key", KEY, "--max-batch", 8, "--max-queue", 64, "--max-tokens", 256)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_module_imports_without_the_server_packages():
    code = ("import sys; import nanogpt_plus.serve; "
            "assert not {'fastapi', 'uvicorn', 'starlette'} & set(sys.modules), 'imported at import time'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def serve_cli(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "nanogpt_plus", "serve", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, PYTHONWARNINGS="ignore"))


def test_cli_errors_are_one_sentence_and_exit_2(ckpt, tmp_path):
    r = serve_cli("--checkpoint", tmp_path / "none")
    assert r.returncode == 2 and r.stderr.startswith("error: no checkpoint at") and "Traceback" not in r.stderr
    r = serve_cli()
    assert r.returncode == 2 and "pass one of --checkpoint and --gpt2-config" in r.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        r = serve_cli("--checkpoint", ckpt, "--port", taken.getsockname()[1])
    assert r.returncode == 2 and "cannot listen on 127.0.0.1:" in r.stderr and "Traceback" not in r.stderr, r.stderr


def generate_greedy(ckpt, prompt: str, n: int, *flags) -> str:
    "What `nanogpt-plus generate --temperature 0` writes after the prompt."
    r = subprocess.run([sys.executable, "-m", "nanogpt_plus", "generate", "gpt", "--checkpoint", str(ckpt),
                        "--continue-tokens", prompt, "--max-new-tokens", str(n), "--temperature", "0", *flags],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(prompt) and r.stdout.endswith("\n")
    return r.stdout[len(prompt):-1]


def test_says_where_it_listens(server, client):
    assert "http://127.0.0.1:" in server.banner and "this machine only" in server.banner, server.banner
    assert [m.id for m in client.models.list().data] == ["tiny"]
    h = server.health()
    assert h["status"] == "ok" and h["context_size"] == CONTEXT and h["n_layer"] == 2


@pytest.mark.parametrize("prompt,n", [("First", 20), ("", 12), ("hear me speak, speak", 30)])  # the last runs past 32
def test_greedy_equals_generate_streamed_or_not(server, client, ckpt, prompt, n):
    want = generate_greedy(ckpt, prompt, n)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == n
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0, stream=True,
                                            logprobs=0))
    assert "".join(c.choices[0].text for c in chunks) == want and chunks[-1].choices[0].finish_reason == "length"
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert "".join(tokens) == want and len(tokens) == n  # every token once, whether an event carries one or several


def test_long_prompt_is_cropped_as_generate_does(server, ckpt):
    prompt = "Before we proceed any further, hear me speak. " * 3  # 138 characters, context 32
    r = httpx.post(server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                   json={"model": "tiny", "prompt": prompt, "max_tokens": 10, "temperature": 0})
    assert r.status_code == 200 and r.headers["x-prompt-cropped"] == str(len(prompt) - CONTEXT)
    assert r.json()["choices"][0]["text"] == generate_greedy(ckpt, prompt, 10)


def test_sampling_settings_seed_n_stop_and_logprobs(server, client, ckpt):
    kw = dict(model="tiny", prompt="All:", max_tokens=30, temperature=0.9, top_p=0.95)
    a = client.completions.create(**kw, seed=7, extra_body={"top_k": 5})
    b = client.completions.create(**kw, seed=7, extra_body={"top_k": 5})
    assert a.choices[0].text == b.choices[0].text  # a seed repeats a sample
    two = client.completions.create(**kw, seed=3, n=2, extra_body={"top_k": 5})
    assert sorted(c.index for c in two.choices) == [0, 1] and two.usage.completion_tokens == 60
    greedy = generate_greedy(ckpt, "All:", 30)
    stop = greedy[6:9]
    for stream in (False, True):
        r = client.completions.create(model="tiny", prompt="All:", max_tokens=30, temperature=0, stop=[stop, "never"],
                                      stream=stream)
        parts = list(r) if stream else [r]
        assert "".join(p.choices[0].text for p in parts) == greedy[:greedy.find(stop)]
        assert parts[-1].choices[0].finish_reason == "stop"
    r = client.completions.create(model="tiny", prompt="All:", max_tokens=8, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text and len(lp.token_logprobs) == 8
    assert all(x <= 0 for x in lp.token_logprobs) and all(len(t) == 2 for t in lp.top_logprobs)
    assert all(max(t.values()) == x for t, x in zip(lp.top_logprobs, lp.token_logprobs))  # greedy picks the likeliest


def post(server, body=None, key=KEY, content=None, headers=None):
    "POST /v1/completions: `body` as JSON, or as raw bytes when it is bytes or a string."
    h = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (bytes, str)): content, body, h["Content-Type"] = body, None, "application/json"
    return httpx.post(server.url + "/v1/completions", headers={**h, **(headers or {})}, json=body, content=content,
                      timeout=30)


HOSTILE = {  # body -> (status, param or None)
    b"{not json": (400, None),
    b"[" * 50_000: (400, None),  # nesting deep enough to break a recursive parser
    b'"just a string"': (400, None),
    json.dumps({"model": "tiny", "prompt": 5}): (400, "prompt"),
    json.dumps({"model": "tiny", "prompt": "Zebra \u20ac"}): (400, "prompt"),  # characters the tokenizer lacks
    json.dumps({"model": "tiny", "prompt": "a", "max_tokens": "ten"}): (400, "max_tokens"),
    json.dumps({"model": "tiny", "prompt": "a", "max_tokens": 2.5}): (400, "max_tokens"),
    json.dumps({"model": "tiny", "prompt": "a", "max_tokens": 10**9}): (400, "max_tokens"),
    json.dumps({"model": "tiny", "prompt": "a", "max_tokens": 0}): (400, "max_tokens"),
    json.dumps({"model": "tiny", "prompt": "a", "n": 1000}): (400, "n"),
    json.dumps({"model": "tiny", "prompt": "a", "temperature": -1}): (400, "temperature"),
    json.dumps({"model": "tiny", "prompt": "a", "temperature": "hot"}): (400, "temperature"),
    b'{"model": "tiny", "prompt": "a", "temperature": NaN}': (400, "temperature"),
    b'{"model": "tiny", "prompt": "a", "max_tokens": Infinity}': (400, "max_tokens"),
    json.dumps({"model": "tiny", "prompt": "a", "top_p": 0}): (400, "top_p"),
    json.dumps({"model": "tiny", "prompt": "a", "top_k": 0}): (400, "top_k"),
    json.dumps({"model": "tiny", "prompt": "a", "stream": "yes"}): (400, "stream"),
    json.dumps({"model": "tiny", "prompt": "a", "stop": ["x"] * 9}): (400, "stop"),
    json.dumps({"model": "tiny", "prompt": "a", "seed": True}): (400, "seed"),
    json.dumps({"model": "gpt-4", "prompt": "a"}): (404, "model"),
    json.dumps({"model": "tiny", "prompt": "a" * 100_000}): (413, None),
}


@pytest.mark.parametrize("body", list(HOSTILE), ids=lambda b: str(b)[:40])
def test_hostile_request_gets_a_4xx_in_openai_format(server, body):
    status, param = HOSTILE[body]
    r = post(server, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["param"] == param
    assert server.health()["status"] == "ok"


def test_body_without_length_is_cut_off_at_the_limit(server):
    def chunks():
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(200): yield b"a" * 1000
        yield b'"}'
    r = post(server, None, content=chunks())  # chunked transfer: no Content-Length to check first
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_api_key_is_required_when_set(server):
    body = {"model": "tiny", "prompt": "a", "max_tokens": 2}
    for key in (None, "wrong", KEY + "x"):
        r = post(server, body, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 401
    assert post(server, body).status_code == 200


def test_chat_completions_say_there_is_no_chat_template(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    assert "chat template" in e.value.body["message"] and e.value.body["code"] == "chat_not_supported"


def test_64_concurrent_streams_all_finish_with_the_right_text(server, ckpt):
    prompts = ["First", "All:", "Speak", "hear", "Before we", "Citizen", "any", "further"]
    want = {p: generate_greedy(ckpt, p, 16) for p in prompts[:2]}  # the CLI for two, the same model in-process for all
    from nanogpt_plus.cli import generation_model, parse_args
    model, tok = generation_model(parse_args(["generate", "gpt", "--checkpoint", str(ckpt)]), torch.device("cpu"))
    for p in prompts:
        ids = tok.encode(p)
        text = tok.decode(model.generate(torch.tensor([ids]), 16, temperature=0)[0, len(ids):].tolist())
        assert want.setdefault(p, text) == text
    aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)

    async def one(p):
        stream = await aclient.completions.create(model="tiny", prompt=p, max_tokens=16, temperature=0, stream=True)
        return p, "".join([c.choices[0].text async for c in stream])

    async def all64():
        return await asyncio.wait_for(asyncio.gather(*(one(prompts[i % 8]) for i in range(64))), timeout=180)
    results = asyncio.run(all64())
    assert len(results) == 64 and all(text == want[p] for p, text in results)
    assert server.wait_for(lambda h: h["active"] == 0 and h["waiting"] == 0, "an idle engine")


def test_queue_bound_429_and_disconnects_free_their_rows_int8(ckpt):
    s = Server(ckpt, "--max-batch", 1, "--max-queue", 2, "--max-tokens", 100_000, "--dtype", "int8")
    body = {"model": "tiny", "prompt": "a", "max_tokens": 100_000, "stream": True}
    streams = []
    try:
        with httpx.Client(timeout=30) as c:
            for i in range(3):  # one decoding, two waiting
                cm = c.stream("POST", s.url + "/v1/completions", json=body)
                streams.append((cm, cm.__enter__()))
                assert streams[-1][1].status_code == 200
                s.wait_for(lambda h: h["active"] + h["waiting"] == i + 1, f"{i + 1} sequences")
            first = streams[0][1].iter_lines()
            assert next(first).startswith("data: {")  # the first is being written
            r = c.post(s.url + "/v1/completions", json=body)
            assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
            steps = s.health()["steps"]
            streams.pop(0)[0].__exit__(None, None, None)  # the client goes away mid-stream
            h = s.wait_for(lambda h: h["waiting"] == 1 and h["active"] == 1, "the next one taking the freed row")
            assert h["steps"] > steps
            while streams: streams.pop()[0].__exit__(None, None, None)
            s.wait_for(lambda h: h["active"] == 0 and h["waiting"] == 0, "every row freed")
            r = c.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": "All:", "max_tokens": 20, "temperature": 0})
            assert r.json()["choices"][0]["text"] == generate_greedy(ckpt, "All:", 20, "--dtype", "int8")  # int8 weights
    finally:
        for cm, _ in streams: cm.__exit__(None, None, None)
        s.stop()


def test_page_writes_and_draws_attention_in_chromium(server, ckpt, tmp_path):
    "The page at / in the system Chromium: type a prompt, generate, see the text, the heatmap drawn, no console errors."
    sync_api = pytest.importorskip("playwright.sync_api", reason="the page's test needs playwright: pip install playwright")
    chrome = os.environ.get("CHROME") or next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser")
                                                if Path(p).exists()), None)
    if chrome is None: pytest.skip("no Chromium: apt-get install chromium, or set CHROME")
    want = "First" + generate_greedy(ckpt, "First", 40)
    errors = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chrome, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 1100})
            page.on("console", lambda m: m.type == "error" and errors.append(m.text))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/", timeout=30_000)
            page.wait_for_function("document.getElementById('model').textContent.startsWith('tiny')", timeout=30_000)
            page.fill("#prompt", "First")
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "40")
            page.fill("#api_key", KEY)
            page.click("#generate")
            page.wait_for_function("document.getElementById('status').textContent.includes('drawn')", timeout=60_000)
            assert page.inner_text("#output") == want
            shaded = page.eval_on_selector_all("#output span[title]", "s => s.map(e => e.title)")
            assert len(shaded) >= 20 and all(t.startswith("p = ") for t in shaded)
            inked = page.evaluate("""() => { const c = document.getElementById('heatmap');
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;
                for (let i = 0; i < d.length; i += 4) if (d[i] < 250) n++; return [n, c.width]; }""")
            assert inked[0] > 0 and inked[1] >= CONTEXT  # the last 32 tokens, at least a pixel each
            page.select_option("#head", "1")
            page.wait_for_function("document.getElementById('heatmap').title.includes('head 1')", timeout=30_000)
            page.screenshot(path=os.environ.get("SERVE_SCREENSHOT", str(tmp_path / "page.png")), full_page=True)
        finally:
            browser.close()
    assert not errors, errors


def test_serves_a_gpt2_directory(tmp_path):
    "A transformers GPT-2 directory (save_pretrained) is served as `generate --gpt2-config DIR` samples it."
    transformers = pytest.importorskip("transformers")
    if MISSING: pytest.skip(f"the server's tests need {', '.join(MISSING)}")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, initializer_range=0.2)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2-tiny")
    prompt = "To be, or not to be"
    gen = subprocess.run([sys.executable, "-m", "nanogpt_plus", "generate", "gpt", "--gpt2-config", str(tmp_path / "gpt2-tiny"),
                          "--continue-tokens", prompt, "--max-new-tokens", "12", "--temperature", "0"],
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert gen.returncode == 0, gen.stderr
    want = gen.stdout[len(prompt):-1]
    s = Server(tmp_path / "gpt2-tiny")
    try:
        r = httpx.post(s.url + "/v1/completions", timeout=60,
                       json={"model": "gpt2-tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0}).json()
    finally:
        s.stop()
    choice = r["choices"][0]
    if choice["finish_reason"] == "length": assert choice["text"] == want
    else: assert want.startswith(choice["text"])  # <|endoftext|> ends a served text; generate writes on

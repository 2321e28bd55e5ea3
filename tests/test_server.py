"""generate.py --serve (lora_core/server.py): OpenAI's own client against a server on a free loopback port, answers
compared with generate.py's, eight clients at once, clients that leave, bad input, Ctrl-C, and the chat page in a
headless Chromium. The openai client and selenium are test-only dependencies."""
from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lora_core.chat import Conversation
from lora_core.data import ALPACA
from lora_core.generation import generate
from lora_core.openai_protocol import Strip
from lora_core.sampling import Sampling
from lora_core.server import add_arguments, host_warning, make_server

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"
GREEDY = Sampling(temperature=0, top_k=0, top_p=1.0, repetition_penalty=1.0)
GREEDY_API = {"temperature": 0, "extra_body": {"repetition_penalty": 1.0}}  # top_k / top_p do nothing when greedy
GREEDY_CLI = ["--temperature", "0", "--repetition-penalty", "1"]
QUESTION = "What is 2+2?"  # greedy SmolLM2 answers and ends with EOS
ZH = "请用中文回答：中国的首都是哪里？"  # answered in Chinese; several characters span two byte tokens
LONG = "Write a long story about a dragon."  # hundreds of tokens: something to stop or cut off
COUNTING = "1, 2, 3, 4, 5,"  # a raw prompt greedy decoding keeps counting from, for ignore_eos runs


def server_args(*argv: str, **cli) -> argparse.Namespace:
    """What generate.py --serve hands to serve(): its own defaults plus the server's options, on port 0."""
    p = argparse.ArgumentParser()
    add_arguments(p)
    a = p.parse_args(["--serve", "--port", "0", *argv])
    defaults = dict(base=MODEL, adapter=None, temperature=0.7, top_k=None, top_p=None, repetition_penalty=1.1,
                    max_new_tokens=256, seed=None, stop=None)
    for k, v in {**defaults, **cli}.items():
        setattr(a, k, v)
    return a


@contextlib.contextmanager
def running(smollm2, *argv: str, **cli):
    """A server on a free loopback port, served from a thread; its log lines collected in server.lines."""
    model, tok = smollm2
    lines: list[str] = []
    server = make_server(model, tok, ALPACA, server_args(*argv, **cli), ALPACA.stop, log=lines.append)
    server.lines = lines
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def server(smollm2):
    with running(smollm2) as s:
        yield s


def openai_client(server, key: str = "none"):
    openai = pytest.importorskip("openai", reason="the API tests use OpenAI's client: pip install openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


def request(server, method: str, path: str, body=None, headers: dict | None = None) -> tuple[int, dict]:
    """(status, JSON body) of one plain HTTP request; body is a dict (sent as JSON) or raw bytes."""
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    status, raw = response.status, response.read()
    conn.close()
    return status, json.loads(raw)


def health(server) -> dict:
    with urllib.request.urlopen(server.url + "/health", timeout=10) as r:
        return json.loads(r.read())


def wait_for(condition, timeout: float = 30.0, what: str = "the server"):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def reference(smollm2, prompt: str, max_tokens: int, stop=ALPACA.stop):
    """generate() called directly: what the server must answer for a raw prompt, greedy."""
    model, tok = smollm2
    return generate(model, tok, tok.encode(prompt), GREEDY, max_tokens, stop)


@pytest.fixture(scope="module")
def generate_py(smollm2_path) -> dict[str, str]:
    """stdout of `generate.py --prompt` and `--interactive` on the same base, greedy (main(argv) in-process)."""
    import contextlib
    import io

    from lora_core.cli import generate as generate_cli

    runs = {"prompt": (["--prompt", QUESTION], ""), "interactive": (["--interactive"], f"{QUESTION}\n{ZH}\n/quit\n")}
    out = {}
    for name, (argv, stdin) in runs.items():
        stdout, stderr, real_stdin = io.StringIO(), io.StringIO(), sys.stdin
        sys.stdin = io.StringIO(stdin)
        try:
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                code = generate_cli.main(["--base", MODEL, "--base-dtype", "fp32", *GREEDY_CLI,
                                          "--max-new-tokens", "16", *argv])
        finally:
            sys.stdin = real_stdin
        assert code == 0, stderr.getvalue()
        out[name] = stdout.getvalue()
    return out


def chat(client, messages: list[dict], max_tokens: int, stream: bool) -> tuple[str, list[str], object]:
    """(answer, streamed pieces, usage) of one greedy chat completion."""
    if not stream:
        r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, **GREEDY_API)
        return r.choices[0].message.content, [], r.usage
    pieces, usage = [], None
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, stream=True,
                                                stream_options={"include_usage": True}, **GREEDY_API):
        usage = chunk.usage or usage
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    return "".join(pieces), pieces, usage


# ---------------------------------------------------------------------------------------------- the API


def test_models_and_health(server, client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].model_extra["base"] == MODEL and models[0].model_extra["context_length"] == 8192
    h = health(server)
    assert h["status"] == "ok" and h["model"] == MODEL
    assert set(h) == {"status", "model", "queued", "running", "completed", "cancelled", "failed"}


def test_completions_equal_generate_py_prompt(smollm2, client, generate_py):
    """/v1/completions given the template-rendered prompt == generate.py --prompt (same template, stop strings,
    max tokens), whole and streamed; the token counts are the generation's own."""
    expected = generate_py["prompt"]
    prompt = ALPACA.prompt(QUESTION)
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, **GREEDY_API)
    pieces, usage = [], None
    for chunk in client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, stream=True,
                                           stream_options={"include_usage": True}, **GREEDY_API):
        usage = chunk.usage or usage
        pieces += [c.text for c in chunk.choices]
    g = reference(smollm2, prompt, 16)
    assert expected == whole.choices[0].text + "\n" == g.text + "\n"
    assert "".join(pieces) == g.text and len([p for p in pieces if p]) > 1
    assert whole.choices[0].finish_reason == "stop"  # EOS
    assert whole.usage.prompt_tokens == usage.prompt_tokens == len(smollm2[1].encode(prompt))
    assert whole.usage.completion_tokens == usage.completion_tokens == len(g.token_ids)
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens


def test_chat_equals_generate_py_interactive(smollm2, client, generate_py):
    """Two chat turns == generate.py --interactive's two answers (template, chat stop strings, history), whole and
    streamed; the Chinese answer streams in whole characters although they span several tokens."""
    out = generate_py["interactive"]
    turns = out.split("User: ")  # input() prints the prompt: "User: Assistant: answer\n" per turn
    assert len(turns) == 4, out
    expected = [t.removeprefix("Assistant: ").removesuffix("\n").strip() for t in turns[1:3]]
    messages = [{"role": "user", "content": QUESTION}]
    first, _, _ = chat(client, messages, 16, stream=False)
    assert first == expected[0]
    assert chat(client, messages, 16, stream=True)[0] == expected[0]
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": ZH}]
    second, _, usage = chat(client, messages, 16, stream=False)
    streamed, pieces, streamed_usage = chat(client, messages, 16, stream=True)
    assert second == streamed == expected[1]
    assert re.search(r"[\u4e00-\u9fff]", second) and not any("\ufffd" in p for p in pieces)
    model, tok = smollm2
    conv = Conversation(tok, ALPACA, 8192, 16)
    conv.history = [(QUESTION, first)]
    prompt_ids = conv.prompt_ids(ZH)
    g = generate(model, tok, prompt_ids, GREEDY, 16, ALPACA.chat_stop)
    assert any("\ufffd" in tok.decode([i]) for i in g.token_ids)  # some character really was split over tokens
    assert usage.prompt_tokens == streamed_usage.prompt_tokens == len(prompt_ids)
    assert usage.completion_tokens == streamed_usage.completion_tokens == len(g.token_ids)


def test_system_message_is_the_preamble(smollm2, client):
    model, tok = smollm2
    system = "You are a terse assistant."
    answer, _, usage = chat(client, [{"role": "system", "content": system}, {"role": "user", "content": QUESTION}],
                            8, stream=False)
    prompt = f"{system}\n\n" + ALPACA.chat_prompt([], QUESTION)
    assert usage.prompt_tokens == len(tok.encode(prompt))
    assert answer == generate(model, tok, tok.encode(prompt), GREEDY, 8, ALPACA.chat_stop).text.strip()


def test_eight_clients_at_once(smollm2, client):
    """Eight requests at once, half streamed: each gets its own greedy answer, none mixed up."""
    prompts = [f"Q: Name an animal whose name starts with the letter {c}.\nA:" for c in "BCDFGHKM"]
    expected = [reference(smollm2, p, 8).text for p in prompts]
    assert len(set(expected)) > 4  # different questions, different answers: a mix-up would show

    def ask(i: int) -> str:
        if i % 2 == 0:
            return client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=8, **GREEDY_API).choices[0].text
        stream = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=8, stream=True, **GREEDY_API)
        return "".join(c.choices[0].text for c in stream if c.choices)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8), timeout=120))
    assert answers == expected


def test_client_cut_off_mid_stream(smollm2, server, client):
    """A client that closes its stream has its generation cancelled; the requests queued behind it are answered."""
    prompts = ["The capital of France is", "The capital of Japan is"]
    expected = [reference(smollm2, p, 8).text for p in prompts]
    before = health(server)
    long = client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=4000, stream=True, temperature=0,
                                     extra_body={"ignore_eos": True})
    chunks = iter(long)
    assert [next(chunks).choices[0].text for _ in range(3)]
    with ThreadPoolExecutor(2) as pool:
        others = [pool.submit(client.completions.create, model=MODEL, prompt=p, max_tokens=8, **GREEDY_API)
                  for p in prompts]
        wait_for(lambda: health(server)["queued"] == 2, what="two queued requests")
        long.close()
        assert [f.result(timeout=60).choices[0].text for f in others] == expected
    wait_for(lambda: health(server)["running"] == 0)
    after = health(server)
    assert after["cancelled"] == before["cancelled"] + 1 and after["completed"] == before["completed"] + 2
    line = next(s for s in reversed(server.lines) if "stopped by cancelled" in s)
    assert int(re.search(r"(\d+) new tokens", line)[1]) < 200  # stopped soon after the client left, not at 4000


def test_full_queue_answers_503_and_a_waiting_client_that_leaves_frees_its_place(smollm2):
    with running(smollm2, "--max-queue", "1") as srv:
        client = openai_client(srv)
        expected = reference(smollm2, "The capital of Italy is", 8).text
        long = client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=4000, stream=True, temperature=0,
                                         extra_body={"ignore_eos": True})
        next(iter(long))  # running now
        body = json.dumps({"model": MODEL, "prompt": "Hello", "max_tokens": 8}).encode()
        waiting = socket.create_connection(srv.server_address[:2])
        waiting.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_for(lambda: health(srv)["queued"] == 1, what="the waiting request")
        status, err = request(srv, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 4})
        assert status == 503 and err["error"]["code"] == "queue_full" and err["error"]["type"] == "server_error"
        waiting.close()
        wait_for(lambda: health(srv)["queued"] == 0, what="the departed client's place to be freed")
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(client.completions.create, model=MODEL, prompt="The capital of Italy is",
                                 max_tokens=8, **GREEDY_API)
            wait_for(lambda: health(srv)["queued"] == 1, what="the next request")
            long.close()
            assert answer.result(timeout=60).choices[0].text == expected
        wait_for(lambda: health(srv)["running"] == 0)
        assert health(srv)["cancelled"] == 2  # the long stream and the request that left the queue


# ---------------------------------------------------------------------------------------------- bad input

USER = [{"role": "user", "content": "Hi"}]
BAD = {  # what is sent -> (status, param, code)
    "malformed JSON": ("/v1/chat/completions", b'{"messages": [', 400, None, "invalid_json"),
    "not an object": ("/v1/completions", b"[1, 2]", 400, None, "invalid_json"),
    "unknown model": ("/v1/completions", {"model": "gpt-4", "prompt": "Hi"}, 404, "model", "model_not_found"),
    "negative max_tokens": ("/v1/completions", {"prompt": "Hi", "max_tokens": -5}, 400, "max_tokens", "invalid_value"),
    "max_tokens not a number": ("/v1/completions", {"prompt": "Hi", "max_tokens": "8"}, 400, "max_tokens",
                                "invalid_type"),
    "temperature too high": ("/v1/chat/completions", {"messages": USER, "temperature": 2.5}, 400, "temperature",
                             "invalid_value"),
    "temperature below 0": ("/v1/completions", {"prompt": "Hi", "temperature": -0.1}, 400, "temperature",
                            "invalid_value"),
    "top_p 0": ("/v1/completions", {"prompt": "Hi", "top_p": 0}, 400, "top_p", "invalid_value"),
    "prompt longer than the context": ("/v1/completions", {"prompt": "hello " * 9000}, 400, "prompt",
                                       "context_length_exceeded"),
    "message longer than the context": ("/v1/chat/completions",
                                        {"messages": [{"role": "user", "content": "hello " * 9000}]}, 400, "messages",
                                        "context_length_exceeded"),
    "empty prompt": ("/v1/completions", {"prompt": ""}, 400, "prompt", "invalid_value"),
    "no messages": ("/v1/chat/completions", {"messages": []}, 400, "messages", "invalid_type"),
    "ends with the assistant": ("/v1/chat/completions", {"messages": USER + [{"role": "assistant", "content": "Yo"}]},
                                400, "messages", "invalid_value"),
    "unknown role": ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role",
                     "invalid_value"),
    "n > 1": ("/v1/completions", {"prompt": "Hi", "n": 2}, 400, "n", "unsupported_parameter"),
    "stop not strings": ("/v1/completions", {"prompt": "Hi", "stop": [1]}, 400, "stop", "invalid_type"),
    "no such route": ("/v1/embeddings", {"input": "Hi"}, 404, None, "not_found"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(server, case):
    path, body, status, param, code = BAD[case]
    got, err = request(server, "POST", path, body)
    assert got == status
    assert set(err) == {"error"} and set(err["error"]) == {"message", "type", "param", "code"}
    assert (err["error"]["param"], err["error"]["code"]) == (param, code)
    assert err["error"]["message"] and "\n" not in err["error"]["message"]
    assert request(server, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2})[0] == 200


def test_openai_client_sees_the_errors(client):
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="Hi", max_tokens=2)
    assert e.value.code == "model_not_found" and e.value.param == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=USER, temperature=9)
    assert e.value.code == "invalid_value" and "temperature" in e.value.message


def test_api_key_is_checked_on_every_api_route(smollm2):
    openai = pytest.importorskip("openai", reason="pip install openai")
    with running(smollm2, "--api-key", "s3cret") as srv:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")):
                status, err = request(srv, method, path, {"prompt": "Hi", "messages": USER}, headers)
                assert status == 401 and err["error"]["code"] == "invalid_api_key", (method, path, headers)
        with pytest.raises(openai.AuthenticationError):
            openai_client(srv, "wrong").models.list()
        good = openai_client(srv, "s3cret")
        assert good.completions.create(model=MODEL, prompt="Hi", max_tokens=2).usage.completion_tokens == 2
        assert health(srv)["status"] == "ok"  # health and the page stay open: the page asks for the key
        with urllib.request.urlopen(srv.url + "/", timeout=10) as r:
            assert '"auth": true' in r.read().decode()


def test_host_warning():
    assert host_warning("127.0.0.1", None) is None and host_warning("localhost", None) is None
    assert "--api-key" in host_warning("0.0.0.0", None) and "--api-key" not in host_warning("0.0.0.0", "k")


def test_strip_streams_what_strip_keeps():
    for text in ["  Hello world.\n\n", "\n\nA  b \n c\n", "   ", "x"]:
        s = Strip()
        pieces = [s.add(c) for c in text]  # character by character: the hardest split
        assert "".join(pieces) == text.strip()


CHILD = """
import argparse, json, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # even if this test runs with SIGINT ignored
import lora_core
from lora_core.data import ALPACA
from lora_core.server import add_arguments, serve
p = argparse.ArgumentParser()
add_arguments(p)
a = p.parse_args(["--serve", "--port", "0"])
vars(a).update(json.loads(sys.argv[1]))
model, tok = lora_core.load("smollm2-135m", dtype="fp32")
sys.exit(serve(model, tok, ALPACA, a, ALPACA.stop))
"""


def test_ctrl_c_ends_serve_cleanly_even_mid_answer(smollm2_path):
    cli = {k: v for k, v in vars(server_args()).items() if k not in ("serve", "host", "port", "api_key", "max_queue")}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(cli)], stderr=subprocess.PIPE, text=True,
                            encoding="utf-8", cwd=ROOT)
    try:
        lines = []
        while not (lines and "OpenAI API:" in lines[-1]):
            line = proc.stderr.readline()
            assert line, "".join(lines)
            lines.append(line)
        url = re.search(r"http://[\d.]+:\d+", lines[-1])[0]
        host, port = url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": COUNTING, "max_tokens": 4000, "stream": True,
                                                            "ignore_eos": True}), {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200 and response.readline().startswith(b"data: ")  # generating now
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert "stopped" in proc.stderr.read()
        conn.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------------------------- the chat page


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("no headless browser here: apt-get install -y chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="the page test drives Chromium with selenium: "
                                    "pip install selenium")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}", "--window-size=1180,820"):
        options.add_argument(flag)
    b = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    yield b
    b.quit()


def _slider(b, name: str, value: float):
    b.execute_script("const s = document.getElementById('s-' + arguments[0]); s.value = arguments[1];"
                     "s.dispatchEvent(new Event('input'));", name, value)


def _ask(b, question: str, timeout: float = 60):
    """Type a question, press Enter, wait for the answer to finish; the answer's element."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    done = len(b.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done]"))
    box = b.find_element(By.ID, "input")
    box.send_keys(question)
    box.send_keys(Keys.ENTER)
    WebDriverWait(b, timeout).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done]")) > done)
    return b.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]


def test_chat_page_streams_a_chinese_answer(server, client, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url + "/")
    assert f"base {MODEL}" in browser.find_element(By.ID, "model").text
    assert [e.get_attribute("name") for e in browser.find_elements(By.CSS_SELECTOR, "#sliders input")] == [
        "temperature", "top_p", "top_k", "repetition_penalty", "max_tokens"]
    _slider(browser, "temperature", 0)
    _slider(browser, "repetition_penalty", 1)
    _slider(browser, "max_tokens", 24)

    first = _ask(browser, ZH)
    expected = chat(client, [{"role": "user", "content": ZH}], 24, stream=False)[0]
    assert first.text == expected and re.search(r"[\u4e00-\u9fff]", first.text)
    assert int(first.get_attribute("data-chunks")) > 1  # arrived piece by piece
    second = _ask(browser, QUESTION)  # the second turn carries the first as history
    history = [{"role": "user", "content": ZH}, {"role": "assistant", "content": expected},
               {"role": "user", "content": QUESTION}]
    assert second.text == chat(client, history, 24, stream=False)[0]
    browser.save_screenshot(str(tmp_path / "server-chat.png"))
    assert (tmp_path / "server-chat.png").stat().st_size > 10_000

    # "new conversation" clears the page; the stop button cancels the generation on the server
    browser.find_element(By.ID, "new").click()
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg")
    before = health(server)["cancelled"]
    _slider(browser, "max_tokens", 2000)
    browser.find_element(By.ID, "input").send_keys(LONG + "\n")  # greedy, alone: a story of hundreds of tokens
    WebDriverWait(browser, 30).until(lambda d: int(d.find_element(By.CSS_SELECTOR, ".msg.assistant")
                                                   .get_attribute("data-chunks")) > 2)
    browser.find_element(By.ID, "stop").click()
    WebDriverWait(browser, 10).until(
        lambda d: d.find_element(By.CSS_SELECTOR, ".msg.assistant").get_attribute("data-done") == "stopped")
    wait_for(lambda: health(server)["cancelled"] == before + 1 and health(server)["running"] == 0,
             what="the stopped answer to be cancelled")

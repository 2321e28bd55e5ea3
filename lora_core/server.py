"""python generate.py --serve: one process holding the model, serving a chat page and OpenAI's HTTP API.

Standard library only (http.server). Handler threads read requests (checked and turned into jobs by
lora_core/openai_protocol.py) and write answers; one worker runs generate() for one request at a time in arrival
order, so the model never sees two at once. Answers stream as
server-sent events piece by piece (generate()'s on_text never splits a character). A client that goes away (a
closed stream, the page's stop button) has its generation cancelled through generate()'s should_stop.

Routes: GET / (the chat page), GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions.
"""
from __future__ import annotations

import argparse
import hmac
import json
import queue
import select
import signal
import socket
import sys
import threading
import traceback
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path

import torch

from .api import base_of
from .data import Template
from .generation import Generated, generate
from .openai_protocol import FINISH, ApiError, Job, Reply, ServedModel, Strip, defaults_of

PAGE = "chat_page.html"  # package data beside this file
MAX_BODY = 4 << 20  # bytes; a whole 8k-token conversation is a few hundred KB of JSON
POLL_S = 0.2  # how often a handler waiting for text checks that its client is still connected
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--serve and its options, added to generate.py's parser."""
    g = parser.add_argument_group("server (--serve)")
    g.add_argument("--serve", action="store_true", help="serve a chat page and an OpenAI-compatible API")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only; "
                   "0.0.0.0 opens it to the network)")
    g.add_argument("--port", type=int, default=7860, help="port to listen on (0: any free port, printed at start)")
    g.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every /v1 route")
    g.add_argument("--max-queue", type=int, default=16, help="requests that may wait for the model; "
                   "more are answered 503 (default 16)")


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse impossible server options before the model is loaded."""
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port}: must be in 0-65535 (0: any free port)")
    if args.max_queue < 1:
        raise ValueError(f"--max-queue {args.max_queue}: must be at least 1")


# ---------------------------------------------------------------------------------------------- the worker


class QueueFull(Exception):
    """No room left for another waiting request."""


class Scheduler:
    """The one worker: runs jobs one at a time in arrival order; at most max_queue wait behind it.

    run() is the worker's loop. serve() runs it in the main thread, where the model was loaded: with torch's OpenMP
    threads, ops issued from a second Python thread once the first has its own team decode about 1.8x slower here
    (2 cores), as the teams oversubscribe the cores and stop spin-waiting. start() runs it in a thread (tests).
    """

    def __init__(self, model, tok, max_queue: int, log: Callable[[str], None] = lambda _: None):
        assert max_queue >= 1, max_queue  # check_arguments() refused it
        self.model, self.tok, self.max_queue, self.log = model, tok, max_queue, log
        self.waiting: deque[Job] = deque()
        self.running: Job | None = None
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0}
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def start(self):
        """Run the worker in a thread of its own."""
        self._thread = threading.Thread(target=self.run, name="lora-core-generate", daemon=True)
        self._thread.start()

    def run(self):
        """Take jobs until close(); generation happens in the calling thread."""
        while (job := self._next()) is not None:
            self._run(job)

    def submit(self, job: Job):
        with self._cond:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the server is busy: {len(self.waiting)} requests are already waiting for the "
                                "model; retry later")
            self.waiting.append(job)
            self._cond.notify()

    def cancel(self, job: Job):
        """A waiting job leaves the queue at once (its place is free); a running one stops after its next token."""
        job.cancelled.set()
        with self._cond:
            if job in self.waiting:
                self.waiting.remove(job)
                self.counts["cancelled"] += 1

    def status(self) -> dict:
        with self._cond:
            return {"queued": len(self.waiting), "running": int(self.running is not None), **self.counts}

    def close(self, timeout: float = 10.0):
        """Cancel everything and let the worker finish; handlers still waiting are told the server stops."""
        with self._cond:
            self._closed = True
            jobs = list(self.waiting) + ([self.running] if self.running else [])
            self.waiting.clear()
            self._cond.notify_all()
        for job in jobs:
            job.cancelled.set()
            job.events.put(("error", "the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)

    def _next(self) -> Job | None:
        with self._cond:
            self.running = None
            while not self.waiting and not self._closed:
                self._cond.wait()
            self.running = None if self._closed else self.waiting.popleft()
            return self.running

    def _run(self, job: Job):
        if job.cancelled.is_set():  # its client left between being taken from the queue and now
            self._count("cancelled")
            return
        try:
            with torch.inference_mode():
                g = generate(self.model, self.tok, job.prompt_ids, job.sampling, job.max_tokens, job.stop, job.seed,
                             on_text=lambda piece: piece and job.events.put(("text", piece)),
                             ignore_eos=job.ignore_eos, should_stop=job.cancelled.is_set)
        except Exception as e:  # one failed request (out of memory, ...) must not take the worker down
            traceback.print_exc(file=sys.stderr)
            self._count("failed")
            job.events.put(("error", f"generation failed: {type(e).__name__}: {e}"))
            return
        self._count("cancelled" if g.stop_reason == "cancelled" else "completed")
        self.log(f"generated: {g.speed()}")
        job.events.put(("done", g))

    def _count(self, what: str):
        with self._cond:
            self.counts[what] += 1


# ---------------------------------------------------------------------------------------------- HTTP


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive for API clients; streams use chunked transfer encoding
    server_version = "lora-core"
    server: Server

    def do_GET(self):
        self._dispatch({"/": self._page, "/health": self._health, "/v1/models": self._models})

    def do_POST(self):
        self._dispatch({"/v1/chat/completions": self._chat, "/v1/completions": self._completions})

    def log_message(self, format, *args):  # noqa: A002 (BaseHTTPRequestHandler's name)
        self.server.log(f"{self.address_string()} {format % args}")

    def _dispatch(self, routes: dict[str, Callable[[], None]]):
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        try:
            try:
                if path.startswith("/v1/"):
                    self._check_key()
                if path not in routes:
                    known = path in ("/", "/health", "/v1/models", "/v1/chat/completions", "/v1/completions")
                    raise ApiError(405 if known else 404, f"{self.command} {path}: " + (
                        "wrong method for this route" if known else "no such route (GET /v1/models, POST "
                        "/v1/chat/completions, POST /v1/completions, GET /health, GET / for the chat page)"),
                        code="method_not_allowed" if known else "not_found")
                routes[path]()
            except ApiError as e:
                self._send_json(e.status, e.body(), retry=e.status == 503)
        except OSError:  # the client went away while we were writing to it
            self.close_connection = True

    def _check_key(self):
        key = self.server.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise ApiError(401, "missing or wrong API key: send the server's --api-key as 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    def _json_body(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise ApiError(411, "a JSON body with a Content-Length header is required", code="length_required")
        if int(length) > MAX_BODY:
            raise ApiError(413, f"the body is {length} bytes; at most {MAX_BODY} are accepted", code="too_large")
        raw = self.rfile.read(int(length))
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ApiError(400, f"the body is not valid JSON ({e})", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, f"the body must be a JSON object, got {type(body).__name__}", code="invalid_json")
        return body

    def _send(self, status: int, data: bytes, content_type: str, retry: bool = False):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if retry:
            self.send_header("Retry-After", "1")
        if status >= 400:  # an error may leave an unread body behind: start the next request on a fresh connection
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def _send_json(self, status: int, obj: dict, retry: bool = False):
        self._send(status, json.dumps(obj, ensure_ascii=False).encode(), "application/json; charset=utf-8", retry)

    # -- routes

    def _page(self):
        self._send(200, self.server.page, "text/html; charset=utf-8")

    def _health(self):
        self._send_json(200, {"status": "ok", "model": self.server.model.model_id, **self.server.scheduler.status()})

    def _models(self):
        self._send_json(200, self.server.model.models())

    def _completions(self):
        self._answer(self.server.model.completion_job(self._json_body()))

    def _chat(self):
        self._answer(self.server.model.chat_job(self._json_body()))

    # -- answering

    def _answer(self, job: Job):
        """Queue the job, then send its answer whole or as a stream; a client gone cancels it."""
        scheduler = self.server.scheduler
        try:
            scheduler.submit(job)
        except QueueFull as e:
            raise ApiError(503, str(e), code="queue_full", kind="server_error") from None
        reply = Reply(job, self.server.model.model_id)
        try:
            if job.stream:
                self._stream(job, reply)
            else:
                self._whole(job, reply)
        except OSError:  # the client went away mid-answer
            scheduler.cancel(job)
            raise

    def _whole(self, job: Job, reply: Reply):
        g = self._wait(job, lambda piece: None)
        if g is not None:
            self._send_json(200, reply.whole(g))

    def _stream(self, job: Job, reply: Reply):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        strip = Strip() if job.chat else None
        if job.chat:
            self._event(reply.chunk(first=True))

        def send(piece: str):
            piece = strip.add(piece) if strip else piece
            if piece:
                self._event(reply.chunk(piece))

        try:
            g = self._wait(job, send)
        except ApiError as e:  # failed after the stream began: said in the stream, as OpenAI does
            self._event(e.body())
        else:
            if g is None:
                return  # the client left
            self._event(reply.chunk(finish=FINISH[g.stop_reason]))
            if job.include_usage:
                self._event(reply.usage_chunk(g))
            self._event("[DONE]")
        self.wfile.write(b"0\r\n\r\n")  # the chunked body's last chunk

    def _event(self, data: dict | str):
        """One server-sent event, as one HTTP chunk."""
        text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
        raw = f"data: {text}\n\n".encode()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(raw), raw))

    def _wait(self, job: Job, on_text: Callable[[str], None]) -> Generated | None:
        """The job's result, passing its text on as it comes; None (job cancelled) when the client left."""
        while True:
            try:
                kind, value = job.events.get(timeout=POLL_S)
            except queue.Empty:
                if self._client_gone():
                    self.server.scheduler.cancel(job)
                    self.close_connection = True
                    return None
                continue
            if kind == "text":
                on_text(value)
            elif kind == "done":
                return value
            else:
                raise ApiError(503 if "shutting down" in value else 500, value, code="generation_failed",
                               kind="server_error")

    def _client_gone(self) -> bool:
        """True when the client has closed its side: the socket reads as ready with nothing in it."""
        try:
            ready, _, _ = select.select([self.connection], [], [], 0)
            return bool(ready) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):  # reset by the peer, or already closed
            return True


class Server(ThreadingHTTPServer):
    """The HTTP server, one daemon thread per connection, and the state its handler threads share."""

    daemon_threads = True

    def __init__(self, model: ServedModel, scheduler: Scheduler, api_key: str | None, host: str, port: int,
                 log: Callable[[str], None]):
        self.model, self.scheduler, self.api_key, self.log = model, scheduler, api_key, log
        self.page = chat_page(model, api_key is not None)
        self._open: dict[threading.Thread, socket.socket] = {}  # handler threads and their connections
        self._http: threading.Thread | None = None
        self._lock = threading.Lock()
        if ":" in host:
            self.address_family = socket.AF_INET6
        try:
            super().__init__((host, port), Handler)
        except OSError as e:
            raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port or --host") from e

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # every address: show this machine's
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}"

    def process_request(self, request, client_address):
        """A thread for the connection, remembered so that close() can end it."""
        t = threading.Thread(target=self.process_request_thread, args=(request, client_address), daemon=True)
        with self._lock:
            self._open[t] = request
        t.start()

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                self._open.pop(threading.current_thread(), None)

    def start(self, worker: bool = True):
        """Serve from a thread of its own; the worker too unless the caller runs it (serve() does)."""
        if worker:
            self.scheduler.start()
        self._http = threading.Thread(target=self.serve_forever, name="lora-core-http", daemon=True)
        self._http.start()

    def close(self, timeout: float = 10.0):
        """Stop serving, stop the worker (cancelling what runs and waits), then every connection and its thread: a
        handler thread left running would drop the last reference to the model while Python shuts down, which
        aborts the process."""
        if self._http is not None:
            self.shutdown()
            self._http.join(timeout)
        self.scheduler.close(timeout)
        self.server_close()
        with self._lock:
            still_open = dict(self._open)
        for sock in still_open.values():
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a thread waiting for the next keep-alive request
            except OSError:  # already closed by its own thread
                pass
        for t in still_open:
            t.join(timeout)


def _names(args: argparse.Namespace) -> tuple[str, str, str | None]:
    """(model id, base, adapter) as the API and the page show them: the adapter's directory name, else the base's."""
    adapter = Path(args.adapter).resolve().name if args.adapter else None
    base = base_of(args.base, args.adapter)
    return adapter or Path(str(base)).name, Path(str(base)).name, adapter


def chat_page(m: ServedModel, auth: bool) -> bytes:
    """The chat page with the model's names and the request defaults written into it (no request needed)."""
    d = m.defaults
    config = {"model": m.model_id, "base": m.base, "adapter": m.adapter, "template": m.template.name,
              "context": m.context, "auth": auth,
              "defaults": {"temperature": d.sampling.temperature, "top_p": d.sampling.top_p, "top_k": d.sampling.top_k,
                           "repetition_penalty": d.sampling.repetition_penalty, "max_tokens": d.max_tokens}}
    html = resources.files(__package__).joinpath(PAGE).read_text(encoding="utf-8")
    script_safe = json.dumps(config, ensure_ascii=False).replace("</", "<\\/")
    return html.replace("/*CONFIG*/null", script_safe).encode()


def host_warning(host: str, api_key: str | None) -> str | None:
    """What to say when the server listens beyond this machine."""
    if host in LOOPBACK or host.startswith("127."):
        return None
    return (f"warning: --host {host} listens beyond this machine: anyone who can reach it can use the model"
            + ("" if api_key else " (add --api-key KEY to require a key)"))


def make_server(model, tok, template: Template | None, args: argparse.Namespace, stop: tuple[str, ...],
                log: Callable[[str], None] | None = None) -> Server:
    """The server, listening but not yet serving: serve() runs it, or server.start() from threads (tests)."""
    if template is None:
        raise ValueError("--serve renders chats with a template: drop --raw (/v1/completions takes raw prompts)")
    check_arguments(args)
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    served = ServedModel(*_names(args), tok, template, model.args.max_seq_len, defaults_of(args, template, stop))
    return Server(served, Scheduler(model, tok, args.max_queue, log), args.api_key, args.host, args.port, log)


def serve(model, tok, template: Template | None, args: argparse.Namespace, stop: tuple[str, ...]) -> int:
    """Serve until Ctrl-C (then exit 0): the chat page at /, OpenAI's API under /v1."""
    server = make_server(model, tok, template, args, stop)
    m = server.model
    warning = host_warning(args.host, args.api_key)
    if warning:
        print(f"generate.py: {warning}", file=sys.stderr)
    print(f"serving {m.model_id} (base {m.base}, template {m.template.name}); Ctrl-C stops\n"
          f"  chat page:  {server.url}/\n  OpenAI API: {server.url}/v1  (model \"{m.model_id}\")",
          file=sys.stderr, flush=True)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None  # `kill` ends it as Ctrl-C does
    server.start(worker=False)
    try:
        server.scheduler.run()  # generation in this thread, where the model was loaded (see Scheduler)
    except KeyboardInterrupt:
        print("\nstopped", file=sys.stderr)
    finally:
        server.close()
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt

"""OpenAI's chat and completion API as lora-core answers it: requests checked field by field and turned into
generation jobs; results turned into OpenAI's response bodies and stream chunks. No HTTP here (lora_core/server.py).

Beyond OpenAI's fields, requests may carry top_k, repetition_penalty and ignore_eos (as vLLM takes them).
"""
from __future__ import annotations

import argparse
import json
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from .chat import Conversation
from .data import Template
from .generation import Generated
from .sampling import Sampling

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "cancelled"}  # -> OpenAI finish_reason
# OpenAI parameters this server cannot honour, with the values that ask for nothing (those are accepted)
UNSUPPORTED = {"n": (1,), "best_of": (1,), "echo": (False,), "logprobs": (False, 0), "top_logprobs": (0,),
               "suffix": ("",), "frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": ({},),
               "tools": ([],), "functions": ([],), "response_format": ({"type": "text"},)}


class ApiError(Exception):
    """A request the server refuses: an HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Defaults:
    """The command line's decoding settings: what a request gets for every field it leaves out."""

    sampling: Sampling
    max_tokens: int
    seed: int | None
    stop: tuple[str, ...]  # completions: --stop, else the template's
    chat_stop: tuple[str, ...]  # chats: --stop, else the template's plus the user's next turn (as --interactive)


def defaults_of(args: argparse.Namespace, template: Template, stop: tuple[str, ...]) -> Defaults:
    """generate.py's settings as request defaults; unset --top-k/--top-p are 40/0.9 (no effect when greedy)."""
    top_k = 40 if args.top_k is None else args.top_k
    top_p = 0.9 if args.top_p is None else args.top_p
    sampling = Sampling(args.temperature, top_k, top_p, args.repetition_penalty)
    sampling.check()
    chat_stop = tuple(args.stop) if args.stop is not None else template.chat_stop
    return Defaults(sampling, args.max_new_tokens, args.seed, tuple(stop), chat_stop)


def _given(body: dict, name: str, types: type | tuple[type, ...], what: str):
    """body[name] checked to be of the JSON type wanted (booleans are not numbers); None when absent or null."""
    v = body.get(name)
    allowed = types if isinstance(types, tuple) else (types,)
    if v is not None and (not isinstance(v, allowed) or isinstance(v, bool) and bool not in allowed):
        raise ApiError(400, f"{name} must be {what}, got {json.dumps(v)[:40]}", name, "invalid_type")
    return v


def _number(body: dict, name: str, default, ok: Callable[[float], bool], expected: str, integer: bool = False):
    """A numeric field checked against its range when given, else the server's default (checked at start)."""
    v = _given(body, name, int if integer else (int, float), "an integer" if integer else "a number")
    if v is None:
        return default
    if not ok(v):
        raise ApiError(400, f"{name} {v}: must be {expected}", name, "invalid_value")
    return v


def _sampling(body: dict, d: Sampling) -> Sampling:
    """temperature and top_p as OpenAI bounds them; top_k and repetition_penalty as vLLM takes them."""
    t = _number(body, "temperature", d.temperature, lambda v: 0 <= v <= 2, "between 0 and 2 (0 is greedy)")
    top_p = _number(body, "top_p", d.top_p, lambda v: 0 < v <= 1, "in (0, 1] (1 switches it off)")
    top_k = _number(body, "top_k", d.top_k, lambda v: v >= 0, ">= 0 (0 switches it off)", integer=True)
    penalty = _number(body, "repetition_penalty", d.repetition_penalty, lambda v: 0 < v <= 10,
                      "in (0, 10] (1 is no penalty)")
    return Sampling(float(t), top_k, float(top_p), float(penalty))


def _stop(body: dict) -> tuple[str, ...] | None:
    """The request's stop strings (a string or a list), None when it gives none."""
    v = body.get("stop")
    if v is None:
        return None
    v = [v] if isinstance(v, str) else v
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise ApiError(400, "stop must be a string or a list of strings", "stop", "invalid_type")
    return tuple(s for s in v if s)


@dataclass(eq=False)  # identity, not field equality: the scheduler looks jobs up in its queue
class Job:
    """One generation: what to run, and the channel its text and result come back on."""

    prompt_ids: list[int]
    sampling: Sampling
    max_tokens: int
    stop: tuple[str, ...]
    seed: int | None = None
    ignore_eos: bool = False
    chat: bool = False
    stream: bool = False
    include_usage: bool = False
    trimmed: int = 0  # chat turns dropped to fit the context
    # ("text", piece) as the answer grows, then ("done", Generated) or ("error", message)
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    cancelled: threading.Event = field(default_factory=threading.Event)


def _job(body: dict, d: Defaults, prompt_ids: list[int], stop: tuple[str, ...], max_tokens: int, chat: bool,
         trimmed: int = 0) -> Job:
    """The job a request asks for, its remaining fields checked."""
    seed = _number(body, "seed", d.seed, lambda v: -2**63 <= v < 2**64, "a 64-bit integer", integer=True)
    options = _given(body, "stream_options", dict, "an object") or {}
    return Job(prompt_ids, _sampling(body, d.sampling), max_tokens, stop, seed,
               ignore_eos=bool(_given(body, "ignore_eos", bool, "true or false")), chat=chat,
               stream=bool(_given(body, "stream", bool, "true or false")),
               include_usage=bool(options.get("include_usage")), trimmed=trimmed)


def _max_tokens(body: dict, d: Defaults) -> int:
    """max_tokens, or max_completion_tokens (its newer name in chats), else --max-new-tokens."""
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return _number(body, name, d.max_tokens, lambda v: v >= 1, "at least 1", integer=True)


def _content(m: dict, i: int) -> str:
    """A message's text: a string or OpenAI's list of {"type": "text", "text": ...} parts."""
    c = m.get("content")
    if isinstance(c, str):
        return c
    if isinstance(c, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                   for p in c):
        return "".join(p["text"] for p in c)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content",
                   "invalid_type")


def chat_turns(messages) -> tuple[str, list[tuple[str, str]], str]:
    """(system text, earlier (user, assistant) pairs, the new user message) from OpenAI's message list.

    System (and developer) messages become the chat preamble; consecutive messages of one role are joined.
    """
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", "messages", "invalid_type")
    system, turns = [], []  # turns: [role, text] with roles alternating
    for i, m in enumerate(messages):
        role = m.get("role")
        if role in ("system", "developer"):
            system.append(_content(m, i))
        elif role in ("user", "assistant"):
            text = _content(m, i)
            if turns and turns[-1][0] == role:
                turns[-1][1] += "\n" + text
            else:
                turns.append([role, text])
        else:
            raise ApiError(400, f"messages[{i}].role {role!r}: this server takes system, user and assistant messages",
                           f"messages[{i}].role", "invalid_value")
    if not turns or turns[0][0] != "user" or turns[-1][0] != "user":
        raise ApiError(400, "the conversation must start and end with a user message", "messages", "invalid_value")
    pairs = [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns) - 1, 2)]
    return "\n".join(system), pairs, turns[-1][1]


@dataclass
class ServedModel:
    """The one model as the API shows it (names, context) and what turns a request body into a Job."""

    model_id: str
    base: str
    adapter: str | None
    tok: object
    template: Template
    context: int
    defaults: Defaults

    def completion_job(self, body: dict) -> Job:
        """/v1/completions: the prompt as given (no template); the request's stop strings, else the server's."""
        self._check_common(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ApiError(400, "prompt must be a string (one prompt per request)", "prompt", "invalid_type")
        ids = self.tok.encode(prompt)
        if not ids:
            raise ApiError(400, "the prompt is empty", "prompt", "invalid_value")
        if len(ids) >= self.context:
            raise ApiError(400, f"the prompt is {len(ids)} tokens; the model's context is {self.context}: shorten it",
                           "prompt", "context_length_exceeded")
        stop = _stop(body)
        return _job(body, self.defaults, ids, self.defaults.stop if stop is None else stop,
                    _max_tokens(body, self.defaults), chat=False)

    def chat_job(self, body: dict) -> Job:
        """/v1/chat/completions: rendered and trimmed as --interactive does (lora_core.chat.Conversation); the chat's
        stop strings always apply, the request's add to them."""
        self._check_common(body)
        system, pairs, message = chat_turns(body.get("messages"))
        template = replace(self.template, chat_pre=system.strip() + self.template.chat_sep) if system else self.template
        max_tokens = _max_tokens(body, self.defaults)
        conv = Conversation(self.tok, template, self.context, max_tokens)
        conv.history = pairs
        try:
            ids = conv.prompt_ids(message)
        except ValueError as e:
            raise ApiError(400, f"{e}: shorten the last message", "messages", "context_length_exceeded") from None
        return _job(body, self.defaults, ids, self.defaults.chat_stop + (_stop(body) or ()), max_tokens, chat=True,
                    trimmed=conv.trimmed)

    def _check_common(self, body: dict):
        """The model asked for, and parameters that would silently change nothing here."""
        model = body.get("model")
        if model is not None and model != self.model_id:
            raise ApiError(404, f"the model {model!r} is not served here; this server has {self.model_id!r} "
                           "(GET /v1/models)", "model", "model_not_found")
        for name, harmless in UNSUPPORTED.items():
            v = body.get(name)
            if v is not None and not any(v == h and isinstance(v, bool) == isinstance(h, bool) for h in harmless):
                raise ApiError(400, f"{name}={json.dumps(v)[:40]} is not supported by this server; leave it out",
                               name, "unsupported_parameter")

    def models(self) -> dict:
        return {"object": "list", "data": [{
            "id": self.model_id, "object": "model", "created": 0, "owned_by": "lora-core", "base": self.base,
            "adapter": self.adapter, "template": self.template.name, "context_length": self.context}]}


class Strip:
    """Streams text as str.strip() leaves it: leading whitespace dropped, trailing whitespace held back until
    more text follows, so a chat answer streams exactly as its history keeps it (Conversation.add)."""

    def __init__(self):
        self.started, self.pending = False, ""

    def add(self, piece: str) -> str:
        if not self.started:
            piece = piece.lstrip()
            self.started = bool(piece)
        text = self.pending + piece
        out = text.rstrip()
        self.pending = text[len(out):]
        return out


def _usage(g: Generated) -> dict:
    return {"prompt_tokens": g.prompt_tokens, "completion_tokens": len(g.token_ids),
            "total_tokens": g.prompt_tokens + len(g.token_ids)}


class Reply:
    """OpenAI's response bodies for one request: the whole answer, or its stream chunks."""

    def __init__(self, job: Job, model_id: str):
        self.job, self.model_id = job, model_id
        self.id = ("chatcmpl-" if job.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _wrap(self, obj: str, choices: list, **extra) -> dict:
        if self.job.trimmed:
            extra["trimmed_turns"] = self.job.trimmed  # ours: the page says the oldest turns were dropped
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model_id, "choices": choices,
                **extra}

    def whole(self, g: Generated) -> dict:
        finish = FINISH[g.stop_reason]
        if self.job.chat:
            message = {"role": "assistant", "content": g.text.strip()}
            return self._wrap("chat.completion", [{"index": 0, "message": message, "logprobs": None,
                                                   "finish_reason": finish}], usage=_usage(g))
        return self._wrap("text_completion", [{"index": 0, "text": g.text, "logprobs": None, "finish_reason": finish}],
                          usage=_usage(g))

    def chunk(self, piece: str = "", finish: str | None = None, first: bool = False) -> dict:
        if self.job.chat:
            delta = {"role": "assistant", "content": ""} if first else {"content": piece} if piece else {}
            return self._wrap("chat.completion.chunk", [{"index": 0, "delta": delta, "logprobs": None,
                                                         "finish_reason": finish}])
        return self._wrap("text_completion", [{"index": 0, "text": piece, "logprobs": None, "finish_reason": finish}])

    def usage_chunk(self, g: Generated) -> dict:
        return self._wrap("chat.completion.chunk" if self.job.chat else "text_completion", [], usage=_usage(g))

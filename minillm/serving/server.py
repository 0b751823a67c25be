"""An OpenAI-compatible HTTP server over the engine: /v1/models, /v1/completions, /v1/chat/completions.

    python -m minillm serve                       # http://127.0.0.1:8000/v1, any OpenAI client:
    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=[...], stream=True)

A Starlette app under uvicorn. The engine steps in its own thread; each HTTP request adds an engine
request (under a lock) and waits on an asyncio queue the engine thread feeds after every step.
Streaming is server-sent events (`data: {...}` lines, then `data: [DONE]`). A client that goes away
aborts its request, so its KV blocks return to the pool at once. A full queue answers 429.
Chat messages are rendered with the chat template, contents as plain text (tokenizer.encode_chat);
a completion's prompt is plain text too: special-token strings never become control tokens.
Not handled: n > 1, logprobs, tools, echo, best_of, several prompts per completion request.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
import uuid

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from .engine import Engine, QueueFull

MODEL_NAME = "SmolLM2-135M-Instruct"


class HTTPError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def response(self) -> JSONResponse:
        kind = {404: "not_found_error", 429: "rate_limit_error", 500: "server_error"}.get(self.status,
                                                                                        "invalid_request_error")
        body = {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


class EngineThread:
    """Steps the engine in a background thread; the event loop talks to it through a lock."""

    def __init__(self, engine: Engine):
        self.engine, self.lock, self.wake = engine, threading.Lock(), threading.Event()
        self.queues: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="minillm-engine", daemon=True)
        self.thread.start()

    def submit(self, prompt: list[int], **params):
        """Add a request; returns it and the queue of (visible text, finished, failure) updates it will get."""
        queue = asyncio.Queue()
        with self.lock:
            request = self.engine.add(prompt, **params)
            self.queues[request.id] = (asyncio.get_running_loop(), queue)
        self.wake.set()
        return request, queue

    def abort(self, request) -> None:
        with self.lock:
            self.engine.abort(request)
            self.queues.pop(request.id, None)

    def _run(self):
        while not self.closed:
            with self.lock:
                try:
                    touched = self.engine.step() if self.engine.has_work else None
                    updates = [(self.queues.pop(r.id, None) if r.finished else self.queues.get(r.id),
                                (self.engine.visible_text(r), r.finished, None)) for r in touched or []]
                except Exception as e:  # a bug must not hang every client: each request in flight gets a 500
                    touched, updates = [], self._fail_all(f"the engine failed: {type(e).__name__}: {e}")
            for target, update in updates:
                if target is not None:
                    loop, queue = target
                    loop.call_soon_threadsafe(queue.put_nowait, update)
            if touched is None:
                self.wake.wait(0.05)
                self.wake.clear()

    def _fail_all(self, message: str) -> list:
        requests = self.engine.scheduler.running + self.engine.scheduler.waiting
        for request in list(requests):
            self.engine.abort(request)
        return [(self.queues.pop(r.id, None), ("", True, message)) for r in requests]

    def close(self):
        self.closed = True
        self.wake.set()
        self.thread.join()


# -- reading a request body: every field a client may send, checked where it enters ---------------
def _field(body: dict, name: str, kinds, default=None, check=None, why: str = ""):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds) or (check and not check(value)):
        raise HTTPError(400, f"'{name}' must be {why}, got {json.dumps(value)[:80]}", param=name)
    return value


def sampling_params(body: dict, default_max: int) -> dict:
    stop = _field(body, "stop", (str, list), [], lambda s: isinstance(s, str) or (
        len(s) <= 4 and all(isinstance(x, str) and x for x in s)), "a string or a list of at most 4 strings")
    n = _field(body, "n", (int,), 1, lambda v: v == 1, "1 (one choice per request is served)")
    del n
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    return dict(
        max_tokens=_field({"max_tokens": max_tokens}, "max_tokens", (int,), default_max, lambda v: v >= 1,
                          "an integer >= 1"),
        temperature=float(_field(body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 2, "a number in [0, 2]")),
        top_p=_field(body, "top_p", (int, float), None, lambda v: 0 < v <= 1, "a number in (0, 1]"),
        top_k=_field(body, "top_k", (int,), None, lambda v: v >= 1, "an integer >= 1"),
        seed=_field(body, "seed", (int,), None, lambda v: 0 <= v < 2**63, "an integer in [0, 2**63)"),
        ignore_eos=_field(body, "ignore_eos", (bool,), False, why="true or false"),  # vLLM's and llama.cpp's extension
        stop=[stop] if isinstance(stop, str) else stop)


def chat_prompt(tokenizer, body: dict) -> list[int]:
    messages = _field(body, "messages", (list,), None, lambda m: len(m) > 0, "a non-empty list of messages")
    if messages is None:
        raise HTTPError(400, "'messages' is required", param="messages")
    turns = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise HTTPError(400, f"messages[{i}].content: only text parts are served", param="messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(content, str):
            raise HTTPError(400, f"messages[{i}] must be {{'role': 'system' | 'user' | 'assistant', "
                                 f"'content': a string}}", param="messages")
        turns.append({"role": m["role"], "content": content})
    return tokenizer.encode_chat(turns, add_generation_prompt=True)


def build_app(engine: Engine, model_name: str = MODEL_NAME) -> Starlette:
    tokenizer, context = engine.tokenizer, engine.model.config.max_seq_len
    runner = EngineThread(engine)

    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        runner.close()

    async def models(_):
        return JSONResponse({"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                                         "owned_by": "minillm"}]})

    async def completions(http: HTTPRequest, chat: bool):
        try:
            try:
                body = json.loads(await http.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise HTTPError(400, f"the request body is not valid JSON: {e}") from None
            if not isinstance(body, dict):
                raise HTTPError(400, "the request body must be a JSON object")
            if body.get("model") != model_name:
                raise HTTPError(404, f"model {body.get('model')!r} does not exist; this server serves "
                                     f"{model_name!r}", param="model", code="model_not_found")
            if chat:
                prompt = chat_prompt(tokenizer, body)
            else:
                text = _field(body, "prompt", (str, list), None, lambda p: isinstance(p, str) or (
                    p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)),
                    "a string or a list of token ids")
                if text is None:
                    raise HTTPError(400, "'prompt' is required", param="prompt")
                prompt = tokenizer.encode(text, disallowed_special=()) if isinstance(text, str) else text
            stream = _field(body, "stream", (bool,), False, why="true or false")
            usage_in_stream = bool(_field(body, "stream_options", (dict,), {}, why="an object").get("include_usage"))
            params = sampling_params(body, max(1, min(context - len(prompt), 256 if chat else 16)))
            if len(prompt) + params["max_tokens"] > context:
                raise HTTPError(400, f"the prompt ({len(prompt)} tokens) + max_tokens ({params['max_tokens']}) "
                                     f"exceeds the model's context of {context}", param="max_tokens",
                                code="context_length_exceeded")
            try:
                request, queue = runner.submit(prompt, **params)
            except QueueFull as e:
                raise HTTPError(429, str(e)) from None
            except ValueError as e:
                raise HTTPError(400, str(e)) from None
        except HTTPError as e:
            return e.response()
        head = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, "created": int(time.time()),
                "model": model_name}
        usage = lambda: {"prompt_tokens": len(prompt), "completion_tokens": len(request.output),  # noqa: E731
                         "total_tokens": len(prompt) + len(request.output)}

        def choice(text, reason, delta: bool):
            if not chat:
                return {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            content = {"content": text} if delta else {"role": "assistant", "content": text}
            return {"index": 0, ("delta" if delta else "message"): content, "finish_reason": reason}

        if not stream:
            try:
                finished = False
                while not finished:
                    _, finished, failure = await queue.get()
            finally:
                if not request.finished:           # the client went away: give the blocks back
                    runner.abort(request)
            if failure:
                return HTTPError(500, failure).response()
            return JSONResponse({**head, "object": "chat.completion" if chat else "text_completion",
                                 "choices": [choice(request.text, request.finish_reason, False)], "usage": usage()})

        kind = "chat.completion.chunk" if chat else "text_completion"

        def event(choices, **extra):
            return f"data: {json.dumps({**head, 'object': kind, 'choices': choices, **extra})}\n\n"

        async def events():
            sent, finished = "", False
            try:
                if chat:
                    yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
                while not finished:
                    text, finished, failure = await queue.get()
                    if failure:
                        yield f"data: {json.dumps({'error': {'message': failure, 'type': 'server_error'}})}\n\n"
                        return
                    if len(text) > len(sent) or finished:
                        new, sent = text[len(sent):], text
                        yield event([choice(new, request.finish_reason if finished else None, True)])
                if usage_in_stream:
                    yield event([], usage=usage())
                yield "data: [DONE]\n\n"
            finally:
                if not request.finished:
                    runner.abort(request)

        return StreamingResponse(events(), media_type="text/event-stream")

    async def chat_completions(http):
        return await completions(http, chat=True)

    async def text_completions(http):
        return await completions(http, chat=False)

    async def stats(_):
        with runner.lock:
            return JSONResponse({**engine.stats, "blocks_in_use": engine.blocks_in_use,
                                 "blocks_held_by_requests": engine.blocks_in_use - engine.blocks.evictable(),
                                 "running": len(engine.scheduler.running), "waiting": len(engine.scheduler.waiting),
                                 "prefix_hit_rate": round(engine.prefix_hit_rate(), 4)})

    app = Starlette(routes=[Route("/v1/models", models), Route("/v1/completions", text_completions, methods=["POST"]),
                            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
                            Route("/stats", stats)], lifespan=lifespan, max_body_size=1 << 20)
    app.state.runner = runner
    return app


class ServerThread:
    """A server in a thread on a free port of 127.0.0.1 (tests, notebooks, benches): `with ServerThread(app) as s`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        self.socket = socket.socket()
        self.socket.bind((host, port))
        self.url = f"http://{host}:{self.socket.getsockname()[1]}/v1"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError(f"the server at {self.url} did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join()
        self.socket.close()

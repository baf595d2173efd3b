"""A local fake OpenAI-compatible chat server for tests and benchmarks (127.0.0.1, random free port).

Real HTTP, real `openai` client on the other side: only the model is fake. It serves
`POST /v1/chat/completions` and the Azure path `POST /openai/deployments/<dep>/chat/completions?api-version=...`,
and can inject the faults a real endpoint produces, so retry / timeout / resume code is tested for real.

Faults (strings):
    "429"        HTTP 429 with `Retry-After: <retry_after_s>`; "429:0.3" sets the header value to 0.3
    "500"        HTTP 500 with an OpenAI-style error body (also "502", "503")
    "hang"       sleep `hang_s` (past the client's timeout) before answering normally
    "malformed"  HTTP 200, content-type JSON, body cut in the middle
    "empty"      HTTP 200, a well-formed completion whose message content is ""

Faults are taken, in order, from a per-match queue (`fault_for("some text", ["429", "500"])`: applied to requests
whose last user message contains that text, deterministic under concurrency) or else from the global queue
(`push_faults(...)`: applied to the next requests in arrival order).

    with FakeOpenAIServer(responder=lambda body: "ok") as server:
        client = OpenAI(base_url=server.base_url, api_key="x")
        ...
        server.calls  # requests received, faults included
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

Responder = Callable[[dict], str]


def last_user_message(body: dict) -> str:
    """Text of the last user message of a chat request ("" when there is none)."""
    for message in reversed(body.get("messages", [])):
        if message.get("role") == "user":
            content = message.get("content", "")
            if isinstance(content, list):  # content parts
                return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
            return str(content)
    return ""


def default_responder(body: dict) -> str:
    """A deterministic answer derived from the request, so equal requests get equal answers."""
    words = last_user_message(body).split()
    return f"Echo of {len(words)} words: " + " ".join(words[-8:])


class FakeOpenAIServer:
    """Threaded HTTP server speaking enough of the chat-completions API for the `openai` client."""

    def __init__(self, responder: Responder | None = None, latency_s: float = 0.0, retry_after_s: float = 1.0,
                 hang_s: float = 5.0, expected_key: str | None = None):
        self.responder = responder or default_responder
        self.latency_s = latency_s
        self.retry_after_s = retry_after_s
        self.hang_s = hang_s
        self.expected_key = expected_key  # when set, requests with another key get 401
        self.requests: list[dict] = []  # one entry per request: path, query, headers, body, fault
        self.inflight = 0  # requests being answered now
        self.max_inflight = 0  # the most answered at once (checks a client's concurrency bound)
        self._faults: deque[str] = deque()
        self._match_faults: dict[str, deque[str]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- scripting -------------------------------------------------------------------------------------
    def push_faults(self, *faults: str) -> None:
        """Faults for the next requests, in arrival order (use with concurrency 1 for determinism)."""
        with self._lock:
            self._faults.extend(faults)

    def fault_for(self, match: str, faults: list[str]) -> None:
        """Faults for the requests whose last user message contains `match`, one per request, in order."""
        with self._lock:
            self._match_faults.setdefault(match, deque()).extend(faults)

    @property
    def calls(self) -> int:
        with self._lock:
            return len(self.requests)

    def user_messages(self) -> list[str]:
        """Last user message of every request received so far, in arrival order."""
        with self._lock:
            return [last_user_message(r["body"]) for r in self.requests if isinstance(r["body"], dict)]

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.max_inflight = 0
            self._faults.clear()
            self._match_faults.clear()

    # ---- lifecycle -------------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def root_url(self) -> str:
        """http://127.0.0.1:PORT (the Azure `azure_endpoint`)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """http://127.0.0.1:PORT/v1 (the OpenAI `base_url`)."""
        return self.root_url + "/v1"

    def start(self) -> FakeOpenAIServer:
        self._stop.clear()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()  # wakes hanging handlers
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> FakeOpenAIServer:  # noqa: PYI034
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- request handling (called from handler threads) ------------------------------------------------
    def _next_fault(self, body: dict) -> str | None:
        text = last_user_message(body) if isinstance(body, dict) else ""
        with self._lock:
            for match, queue in self._match_faults.items():
                if queue and match in text:
                    return queue.popleft()
            return self._faults.popleft() if self._faults else None

    def _record(self, entry: dict) -> None:
        with self._lock:
            self.requests.append(entry)

    def _enter(self) -> None:
        with self._lock:
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)

    def _leave(self) -> None:
        with self._lock:
            self.inflight -= 1


def _completion(model: str, content: str, prompt: str) -> dict:
    prompt_tokens = max(1, len(prompt.split()))
    completion_tokens = len(content.split())
    return {
        "id": f"chatcmpl-fake-{abs(hash((model, prompt))) % 10**12}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                     "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def _make_handler(server: FakeOpenAIServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real endpoints
        disable_nagle_algorithm = True  # headers and body are separate writes: without this, +40 ms per answer

        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def _send(self, status: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            try:
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                pass

        def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
            body = {"error": {"message": message, "type": "fake_error", "code": str(status)}}
            self._send(status, json.dumps(body).encode(), headers)

        def do_POST(self) -> None:
            server._enter()
            try:
                self._post()
            finally:
                server._leave()

        def _post(self) -> None:
            url = urlparse(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            try:
                body = json.loads(raw)
            except json.JSONDecodeError:
                body = {"_unparsed": raw.decode("utf-8", "replace")}
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            azure = url.path.startswith("/openai/deployments/")
            key = self.headers.get("api-key") if azure else (self.headers.get("Authorization") or "")
            key = (key or "").removeprefix("Bearer ")
            fault = None if "_unparsed" in body else server._next_fault(body)
            entry = {"path": url.path, "query": query, "body": body, "fault": fault, "key": key,
                     "time": time.monotonic()}
            server._record(entry)

            if azure:
                parts = url.path.split("/")  # ['', 'openai', 'deployments', dep, 'chat', 'completions']
                if len(parts) != 6 or parts[4:] != ["chat", "completions"]:
                    return self._error(404, f"unknown path {url.path}")
                if "api-version" not in query:
                    return self._error(400, "missing api-version query parameter")
                entry["deployment"] = parts[3]
            elif url.path != "/v1/chat/completions":
                return self._error(404, f"unknown path {url.path}")
            if "_unparsed" in body:  # e.g. a client killed in the middle of sending
                return self._error(400, "request body is not valid JSON")
            if server.expected_key is not None and key != server.expected_key:
                return self._error(401, "invalid api key")

            if server.latency_s:
                server._stop.wait(server.latency_s)
            model = str(body.get("model") or entry.get("deployment") or "fake")
            if fault is not None and fault.startswith("429"):
                value = fault.split(":", 1)[1] if ":" in fault else f"{server.retry_after_s:g}"
                return self._error(429, "rate limited", {"Retry-After": value})
            if fault in {"500", "502", "503"}:
                return self._error(int(fault), "server error")
            if fault == "hang":
                server._stop.wait(server.hang_s)
            if fault == "malformed":
                payload = json.dumps(_completion(model, "cut", "x")).encode()
                return self._send(200, payload[: len(payload) // 2])
            content = "" if fault == "empty" else server.responder(body)
            prompt = last_user_message(body)
            self._send(200, json.dumps(_completion(model, content, prompt)).encode())

    return Handler

"""A real OpenAI-compatible chat-completions server on 127.0.0.1 with a scripted judge, for judge tests.

It speaks HTTP for real (ThreadingHTTPServer), so the client's retries, timeouts, key handling, concurrency cap
and cache are exercised end to end instead of patched out. Knobs: `api_key` (401 when it doesn't match),
`fail_next(codes)` (answer these statuses first, e.g. 429, 500; an item may be (status, headers), e.g.
(429, {"Retry-After": "3600"})), `delay` (seconds to sleep per request), `policy` (messages -> reply text),
`redirect_to` (answer every request with a 302 to this URL), `raw_reply` (send these bytes as the 200 body
instead of a chat completion), `huge_reply` (a reply of this many bytes, the scripted failures' too, streamed in 1 MiB pieces and never
held whole), `drip` (send the 200 reply one byte every `drip` seconds), `drip_headers` (its status line and headers too), `echo_auth` (the reply quotes the request's
Authorization header, as a hostile or debugging server might). It records every request body, every Authorization header, the request count
and the most requests it ever had in flight.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MARKER = "EXCELLENT"
_A = re.compile(r"\[Output \(a\)\]\n(.*?)\n\[End of output \(a\)\]", re.S)
_B = re.compile(r"\[Output \(b\)\]\n(.*?)\n\[End of output \(b\)\]", re.S)


def _user_text(messages) -> str:
    return "\n".join(m.get("content", "") for m in messages if m.get("role") == "user")


def pairwise_outputs(messages) -> tuple[str, str] | None:
    text = _user_text(messages)
    a, b = _A.search(text), _B.search(text)
    return (a.group(1), b.group(1)) if a and b else None


def scripted_judge(messages) -> str:
    """Pairwise: the output containing MARKER wins, else the longer one ("TIE" markers in both -> tie).
    Rating prompts: "[[7]]", except "[[?]]" (unparseable) when the graded answer contains NORATING."""
    pair = pairwise_outputs(messages)
    if pair is not None:
        a, b = pair
        if (MARKER in a) != (MARKER in b):
            return "Output (a)" if MARKER in a else "Output (b)"
        if "TIE" in a and "TIE" in b:
            return "Tie"
        return "Output (a)" if len(a) >= len(b) else "Output (b)"
    if "[[rating]]" in "\n".join(m.get("content", "") for m in messages):
        if "NORATING" in _user_text(messages):
            return "I cannot decide. Rating: [[?]]"
        return "The answer is fine.\n\nRating: [[7]]"
    return "hello"


def always_first(messages) -> str:
    """A maximally position-biased judge: always picks whatever is shown first."""
    return "Output (a)"


class JudgeServer:
    def __init__(self, api_key: str | None = None, policy=scripted_judge, delay: float = 0.0):
        self.api_key = api_key
        self.policy = policy
        self.delay = delay
        self.redirect_to: str | None = None
        self.raw_reply: bytes | None = None
        self.huge_reply = 0
        self.drip = 0.0
        self.drip_headers = 0.0
        self.echo_auth = False
        self.bodies: list[dict] = []
        self.auth_headers: list[str | None] = []
        self.n_requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._failures: list[int] = []
        # A request still sleeping from an earlier test (timeout test) must not be recorded in the next one.
        self._epoch = 0
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------------ control

    @property
    def base_url(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def fail_next(self, codes) -> None:
        with self._lock:
            self._failures.extend(codes)

    def reset(self) -> None:
        with self._lock:
            self.bodies.clear()
            self.auth_headers.clear()
            self._failures.clear()
            self.n_requests = self.in_flight = self.max_in_flight = 0
            self._epoch += 1
        self.policy, self.delay, self.api_key = scripted_judge, 0.0, None
        self.redirect_to, self.raw_reply = None, None
        self.huge_reply, self.drip, self.echo_auth, self.drip_headers = 0, 0.0, False, 0.0

    def start(self) -> JudgeServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                with server._lock:
                    server.n_requests += 1
                    server.auth_headers.append(self.headers.get("Authorization"))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    fail = server._failures.pop(0) if server._failures else None
                    epoch = server._epoch
                try:
                    self._handle(raw, fail, epoch)
                finally:
                    with server._lock:
                        if server._epoch == epoch:
                            server.in_flight -= 1

            def _handle(self, raw, fail, epoch):
                if server.delay:
                    time.sleep(server.delay)
                if server.redirect_to is not None:
                    return self._send(302, {}, headers={"Location": server.redirect_to})
                if not self.path.split("?")[0].endswith("/v1/chat/completions"):
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                if server.api_key is not None and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    return self._send(401, {"error": {"message": "Incorrect API key provided"}})
                if fail is not None:
                    code, headers = fail if isinstance(fail, tuple) else (fail, None)
                    if headers is None and code == 429:
                        headers = {"Retry-After": "0"}
                    if server.huge_reply:
                        return self._send_huge(server.huge_reply, code, headers)
                    return self._send(code, {"error": {"message": f"scripted failure {code}"}}, headers=headers)
                if server.raw_reply is not None:
                    return self._send(200, server.raw_reply)
                if server.huge_reply:
                    return self._send_huge(server.huge_reply)
                body = json.loads(raw)
                with server._lock:
                    if server._epoch == epoch:
                        server.bodies.append(body)
                reply = server.policy(body["messages"])
                if server.echo_auth:
                    reply = f"{reply}\n(debug: you sent Authorization: {self.headers.get('Authorization')})"
                self._send(200, {"id": "chatcmpl-test", "object": "chat.completion", "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": reply}}],
                                 "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

            def _send(self, code, obj, headers=None):
                data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    if server.drip_headers:  # the status line and headers a byte at a time too
                        head = b"".join(self._headers_buffer)
                        self._headers_buffer = []
                        for i in range(len(head)):
                            self.wfile.write(head[i:i + 1])
                            self.wfile.flush()
                            time.sleep(server.drip_headers)
                    self.end_headers()
                    if server.drip and code == 200:
                        for i in range(len(data)):
                            self.wfile.write(data[i:i + 1])
                            self.wfile.flush()
                            time.sleep(server.drip)
                    else:
                        self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError, OSError):
                    pass  # the client gave up (timeout, deadline, size cap tests)

            def _send_huge(self, n, code=200, headers=None):
                piece = b'{"pad": "' + b"x" * (1 << 20)
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(n))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    sent = 0
                    while sent < n:
                        chunk = piece[:n - sent]
                        self.wfile.write(chunk)
                        sent += len(chunk)
                except (BrokenPipeError, ConnectionResetError, OSError):
                    pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True, name="judge-server")
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

"""An OpenAI-style Locust workload for the mornGPT proxy (or any OpenAI-compatible API).

Each simulated user sends chat completions back to back: a configurable share of them
streamed, with prompts of random sizes, to random models, under random API keys.
Besides Locust's own request statistics it reports two custom metrics, as rows of
the statistics table:

- type ``TTFT``: time to the first token of a streamed answer, in milliseconds;
- type ``OVERHEAD``: the proxy's own time for the request, from its
  ``X-Proxy-Overhead-Ms`` response header, in *microseconds* (Locust rounds its
  figures to whole numbers; absent when the target is not the proxy).

A request fails when the status is not 200, a body is not a chat completion, or a
stream ends without ``data: [DONE]`` or with an error event.

    locust -f bench/locustfile.py --headless -u 50 -r 10 -t 1m \\
        --host http://127.0.0.1:8080 --stream-share 0.7 --prompt-words 16,256,2048 \\
        --models demo-chat --exit-code-on-error 1

Keys come from ``--api-keys`` or, better (flags show in ``ps``), ``$LOCUST_API_KEYS``;
comma-separated. This file needs only Locust, no part of the proxy.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from typing import Any

from locust import FastHttpUser, events, task
from locust.argument_parser import LocustArgumentParser
from locust.env import Environment

OVERHEAD_HEADER = "X-Proxy-Overhead-Ms"  # proxy/exchange.py OVERHEAD_HEADER
PATH = "/v1/chat/completions"
# A fixed vocabulary: prompts of a given size are all alike, so runs compare.
WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "proxies")


@events.init_command_line_parser.add_listener
def _options(parser: LocustArgumentParser) -> None:
    # Locust's own add_argument (not a group's): it knows is_secret and the web UI.
    parser.add_argument(
        "--stream-share",
        type=float,
        default=0.5,
        env_var="LOCUST_STREAM_SHARE",
        help="share of requests that stream, 0 to 1 (default 0.5)",
    )
    parser.add_argument(
        "--prompt-words",
        default="16,128,1024",
        env_var="LOCUST_PROMPT_WORDS",
        help="prompt sizes in words, one picked at random per request (default 16,128,1024)",
    )
    parser.add_argument(
        "--models",
        default="gpt-4o-mini",
        env_var="LOCUST_MODELS",
        help="model names, one picked at random per request",
    )
    parser.add_argument(
        "--api-keys",
        default="sk-anything",
        env_var="LOCUST_API_KEYS",
        is_secret=True,
        help="API keys, one picked at random per request (prefer $LOCUST_API_KEYS)",
    )
    parser.add_argument(
        "--max-tokens", type=int, default=64, env_var="LOCUST_MAX_TOKENS", help="max_tokens"
    )
    parser.add_argument(
        "--extra-header",
        action="append",
        default=[],
        help="'Name: value' sent with every request (repeatable), e.g. the bundled fake "
        "upstream's 'x-fake-chunks: 64' and 'x-fake-gap-ms: 20' through the proxy",
    )


class Workload:
    """The parsed options, decided once per run."""

    def __init__(self, options: Any) -> None:
        self.stream_share = float(options.stream_share)
        sizes = [int(n) for n in _split(options.prompt_words)]
        self.prompts = [" ".join(WORDS[i % len(WORDS)] for i in range(n)) for n in sizes]
        self.models = _split(options.models)
        self.keys = _split(options.api_keys)
        self.max_tokens = int(options.max_tokens)
        self.headers = dict(_header(h) for h in options.extra_header)

    def next(self) -> tuple[bool, bytes, dict[str, str]]:
        """One request: (stream?, body, headers)."""
        stream = random.random() < self.stream_share
        body: dict[str, Any] = {
            "model": random.choice(self.models),
            "messages": [{"role": "user", "content": random.choice(self.prompts)}],
            "max_tokens": self.max_tokens,
        }
        if stream:
            body["stream"] = True
        headers = {
            **self.headers,
            "Authorization": f"Bearer {random.choice(self.keys)}",
            "Content-Type": "application/json",
        }
        return stream, json.dumps(body).encode(), headers


def _split(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError(f"expected a comma-separated list, got {text!r}")
    return items


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise ValueError(f"--extra-header wants 'Name: value', got {text!r}")
    return name.strip(), value.strip()


class ChatUser(FastHttpUser):
    """Sends chat completions back to back (no think time: load, not realism)."""

    workload: Workload | None = None

    def on_start(self) -> None:
        if ChatUser.workload is None:
            ChatUser.workload = Workload(self.environment.parsed_options)

    @task
    def chat(self) -> None:
        assert self.workload is not None
        stream, body, headers = self.workload.next()
        if stream:
            self._stream(body, headers)
        else:
            self._complete(body, headers)

    def _complete(self, body: bytes, headers: dict[str, str]) -> None:
        name = "chat"
        with self.client.post(
            PATH, data=body, headers=headers, name=name, catch_response=True
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {(resp.text or '')[:200]}")
                return
            if not _is_completion(resp.content):
                resp.failure(f"not a chat completion: {(resp.text or '')[:200]}")
                return
            _metric(self.environment, "OVERHEAD", f"{name} (µs)", _overhead_us(resp.headers))

    def _stream(self, body: bytes, headers: dict[str, str]) -> None:
        name = "chat stream"
        start = time.perf_counter()
        with self.client.post(
            PATH, data=body, headers=headers, name=name, catch_response=True, stream=True
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}")
                return
            overhead = _overhead_us(resp.headers)
            first: float | None = None
            done = False
            for data in _events(resp):
                if data == b"[DONE]":
                    done = True  # read on to the end: the connection is reused
                    continue
                if data.startswith(b'{"error"'):
                    resp.failure(f"error event: {data[:200]!r}")
                    return
                if first is None and _has_token(data):
                    first = time.perf_counter()
            # The whole stream, not just its headers, is the request's time.
            resp.request_meta["response_time"] = (time.perf_counter() - start) * 1000
            if not done:
                resp.failure("stream ended without data: [DONE]")
                return
            if first is not None:
                _metric(self.environment, "TTFT", f"{name} (ms)", (first - start) * 1000)
            _metric(self.environment, "OVERHEAD", f"{name} (µs)", overhead)


def _is_completion(content: bytes | None) -> bool:
    try:
        return isinstance(json.loads(content or b"")["choices"][0]["message"], dict)
    except (ValueError, KeyError, IndexError, TypeError):
        return False


def _events(resp: Any) -> Iterator[bytes]:
    """The data payload of each SSE event as soon as its line is complete (one
    ``data:`` line per event, as OpenAI sends them); other fields are skipped.

    Lines come from geventhttpclient's ``readline``: Locust's ``iter_content(n)`` waits
    until n bytes are in, which would hide the time to the first token."""
    readline = resp._response.readline
    while line := readline(b"\n"):
        if line.startswith(b"data:"):
            yield line[5:].strip()


def _has_token(data: bytes) -> bool:
    """Whether a chat chunk carries answer text (the first chunk only names the role)."""
    try:
        choices = json.loads(data).get("choices") or []
    except ValueError:
        return False
    return any((c.get("delta") or {}).get("content") for c in choices)


def _overhead_us(headers: Any) -> float | None:
    value = headers.get(OVERHEAD_HEADER) if headers else None
    try:
        return float(value) * 1000 if value is not None else None
    except ValueError:
        return None


def _metric(environment: Environment, kind: str, name: str, value: float | None) -> None:
    """A custom metric as a row of Locust's statistics (its "response time" is the value)."""
    if value is None:
        return
    environment.events.request.fire(
        request_type=kind,
        name=name,
        response_time=value,
        response_length=0,
        exception=None,
        context={},
    )

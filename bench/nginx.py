"""A canned upstream that is never the bottleneck: nginx serving fixed chat answers.

``bench/fake_upstream.py`` renders and writes every event in Python; at ~2,000 streams
a second of 63 events it needs a CPU of its own, so against it a faster subject does
not spend less CPU per request, it reads more often, with fewer events per read
(docs/performance.md, "Why long streams need a fast upstream"). nginx sends the same
bytes for a few microseconds: what issue #17's ratios are measured against (table (e)
of ``bench.run``).

Every POST to ``/v1/chat/completions`` gets the fake upstream's answer
(``fake_upstream.canned_chat``) chosen by its ``x-fake-chunks`` header: none, a JSON
answer of ``chat`` tokens; N (one of ``streams``), a stream of N tokens, written at once
with a Content-Length, so most of it arrives in one read. Streams always carry
``"usage":null`` in each chunk and the usage chunk, as when the client asked for
usage: a proxy that asked on the client's behalf strips them, as it would from any
upstream. Nothing here paces, stalls or fails: those probes use the fake upstream.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from .fake_upstream import canned_chat
from .procs import Service, debian_tool, free_port, pinned


def config(folder: Path, port: int, chat: int, streams: Iterable[int]) -> Path:
    """Write the answers (a chat of ``chat`` tokens, a stream of each of ``streams``)
    and an nginx config serving them on ``port`` into ``folder``."""
    answers = {"chat": canned_chat(chat, stream=False)}
    answers.update({f"sse{n}": canned_chat(n, stream=True) for n in set(streams)})
    for name, body in answers.items():
        (folder / name).write_bytes(body)

    def served(name: str, content_type: str) -> str:
        # The static module refuses POST (405); error_page serves the file anyway.
        return (
            f"    location = /{name} {{ internal; default_type {content_type}; "
            f"alias {folder / name}; error_page 405 =200 $uri; }}\n"
        )

    sse = "".join(served(name, "text/event-stream") for name in answers if name != "chat")
    path = folder / "nginx.conf"
    # As root, nginx's worker would run as nobody, who cannot read a private workdir.
    user = "user root;\n" if os.geteuid() == 0 else ""
    path.write_text(
        f"""{user}worker_processes 1;
daemon off;
pid {folder / "nginx.pid"};
error_log stderr notice;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  keepalive_requests 1000000000;
  keepalive_timeout 300s;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location = /v1/chat/completions {{
      if ($http_x_fake_chunks) {{ rewrite ^ /sse$http_x_fake_chunks last; }}
      rewrite ^ /chat last;
    }}
{served("chat", "application/json")}{sse}  }}
}}
"""
    )
    return path


def start(
    workdir: Path, cpus: frozenset[int] | None, chat: int, streams: Iterable[int]
) -> tuple[Service, str]:
    """Start nginx (Debian's ``nginx-light`` if it is missing) on a free port, serving
    ``config``'s answers: the service and its base URL ending in /v1."""
    nginx = debian_tool("nginx", "nginx-light")
    folder = workdir / "nginx"
    folder.mkdir(exist_ok=True)
    port = free_port()
    conf = config(folder, port, chat, streams)
    argv = [nginx, "-c", str(conf), "-p", str(folder), "-e", "stderr"]
    service = Service("nginx", pinned(argv, cpus), workdir, workdir / "nginx.log")
    service.wait_for("start worker process")
    return service, f"http://127.0.0.1:{port}/v1"

"""Instructions per request of the served proxy, by function: ``python -m bench.callgrind``.

Wall time and CPU time on this shared machine move by 10-30 % between runs; the
instructions valgrind counts do not. This runs ``python -m proxy serve`` (bare, or
governed with a throwaway Redis and PostgreSQL database) under
``valgrind --tool=callgrind`` in front of nginx's canned answers (``bench/nginx.py``),
sends each kind of ``bench.run`` over a few keep-alive connections, and brackets each
kind's measured requests with ``callgrind_control -z`` (zero) and ``-d`` (dump), so a
dump holds that kind's requests only, warm. It prints the event loop's thread's
instructions per request and the functions dearest per request (inclusive), and keeps
the dumps (``--out``) for ``callgrind_annotate --inclusive=yes``.

Run it from the tree to measure, compiled (``bash scripts/compiled python -m
bench.callgrind``); valgrind slows the proxy ~50x, so a few hundred requests a kind
take a minute or two. Two trees compare by their printed tables (same kinds, same
``--requests``): the counts repeat to a fraction of a per cent.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import httptools

from . import governed as modes
from . import nginx
from .procs import Service, debian_tool, free_port, python
from .run import _HEADERS, CHAT_TOKENS, KIND_TOKENS, KINDS

CONNECTIONS = 4
WARM = 100  # requests of each kind before its count starts


def request_bytes(kind: str, port: int) -> bytes:
    headers = dict(_HEADERS, Host=f"127.0.0.1:{port}")
    if kind in KIND_TOKENS:
        headers["x-fake-chunks"] = str(KIND_TOKENS[kind])
    body = KINDS[kind]
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    start = f"POST /v1/chat/completions HTTP/1.1\r\n{head}Content-Length: {len(body)}\r\n\r\n"
    return start.encode() + body


class _Answers:
    """Counts complete responses on one connection (httptools' callbacks)."""

    def __init__(self) -> None:
        self.done = 0
        self.status = 0
        self.parser = httptools.HttpResponseParser(self)

    def on_message_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.done += 1


class _Client:
    """``CONNECTIONS`` keep-alive connections to the proxy, kept across kinds."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.streams: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def open(self) -> None:
        for _ in range(CONNECTIONS):
            self.streams.append(await asyncio.open_connection("127.0.0.1", self.port))

    async def send(self, kind: str, requests: int) -> None:
        """``requests`` requests of ``kind``, spread over the connections."""
        request = request_bytes(kind, self.port)
        each = -(-requests // CONNECTIONS)
        await asyncio.gather(*(_one_by_one(*ends, request, each) for ends in self.streams))

    def close(self) -> None:
        for _, writer in self.streams:
            writer.close()


async def _one_by_one(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes, count: int
) -> None:
    answers = _Answers()
    for sent in range(1, count + 1):
        writer.write(request)
        while answers.done < sent:
            data = await reader.read(65536)
            if not data:
                raise ConnectionError("the proxy closed the connection")
            answers.parser.feed_data(data)
        if answers.status != 200:
            raise RuntimeError(f"the proxy answered {answers.status}")


def loop_thread_total(dump: Path) -> int:
    """The event loop's thread's instructions in a dump (``--separate-threads``: the
    first thread's file)."""
    text = dump.read_text(errors="replace")
    found = re.search(r"^(?:summary|totals): (\d+)", text, re.MULTILINE)
    if found is None:
        raise RuntimeError(f"no totals in {dump}")
    return int(found.group(1))


def costs(dump: Path, inclusive: bool) -> dict[str, int]:
    """Instructions by function in a dump (``callgrind_annotate``'s table; a function
    name without its file and object)."""
    argv = ["callgrind_annotate", f"--inclusive={'yes' if inclusive else 'no'}", "--threshold=100"]
    out = subprocess.run([*argv, str(dump)], capture_output=True, text=True, check=True).stdout
    found: dict[str, int] = {}
    for line in out.splitlines():
        row = re.match(r"\s*([\d,]+) \([^)]*\)\s+(?:\S*:)?([^\s:]+)(?: \[.*\])?$", line)
        if row and row.group(2) != "TOTALS":
            name = row.group(2).removesuffix("'2")
            found[name] = max(found.get(name, 0), int(row.group(1).replace(",", "")))
    return found


def table(dump: Path, requests: int, top: int) -> list[str]:
    """The dearest functions per request: by their own instructions, and the project's
    own (mypyc's ``CPyDef_``) by inclusive ones. Rows as dear as the whole dump are the
    stack the dump was taken under, and left out."""
    total = loop_thread_total(dump)
    lines = []
    for inclusive in (False, True):
        rows = sorted(
            (
                (count, name)
                for name, count in costs(dump, inclusive).items()
                if count < total and (not inclusive or name.startswith("CPyDef_"))
            ),
            reverse=True,
        )
        lines.append("inclusive, the project's functions:" if inclusive else "self:")
        lines += [f"{count // requests:>10,}  {name}" for count, name in rows[:top]]
    return lines


@contextlib.contextmanager
def served(workdir: Path, mode: str, upstream: str) -> Iterator[tuple[Service, int]]:
    """The proxy under callgrind, one worker (no child process), ready."""
    port = free_port()
    path = workdir / "proxy.json"
    with contextlib.ExitStack() as stack:
        if mode == "bare":
            config = modes.bare(upstream, port, 1)
        else:
            redis, dsn = stack.enter_context(modes.backends(workdir, upstream))
            config = modes.governed(upstream, port, 1, redis, dsn)
        checked = modes.write(config, path)
        argv = [
            debian_tool("valgrind", "valgrind"),
            "--tool=callgrind",
            "--separate-threads=yes",
            f"--callgrind-out-file={workdir / 'cg.out'}",
            python(),
            "-m",
            "proxy",
            "serve",
            "--config",
            str(path),
        ]
        if not checked.auth.enabled:
            argv.append("--no-auth")
        service = Service("proxy", argv, workdir, workdir / "proxy.log")
        stack.callback(service.stop, 120.0)
        service.wait_for("listening on", timeout=300.0)
        yield service, port


def measure(
    pid: int, port: int, mode: str, kinds: Sequence[str], requests: int, workdir: Path, out: Path
) -> list[tuple[str, int, Path]]:
    """Each kind's dump, kept in ``out``: (kind, loop thread's instructions a request, path)."""
    control = debian_tool("callgrind_control", "valgrind")
    measured = []
    with asyncio.Runner() as runner:  # one loop: the connections stay open across kinds
        client = _Client(port)
        runner.run(client.open())
        try:
            for number, kind in enumerate(kinds, 1):
                runner.run(client.send(kind, WARM))
                subprocess.run([control, "-z", str(pid)], check=True, capture_output=True)
                runner.run(client.send(kind, requests))
                subprocess.run([control, "-d", kind, str(pid)], check=True, capture_output=True)
                # The n-th dump's files are cg.out.<n>-<thread>; the loop's thread is 01.
                tag = kind.replace(" ", "-").replace("+", "")
                kept = out / f"{mode}-{tag}.cg"
                kept.write_bytes((workdir / f"cg.out.{number}-01").read_bytes())
                for made in workdir.glob(f"cg.out.{number}-*"):
                    made.unlink()
                measured.append((kind, loop_thread_total(kept) // requests, kept))
        finally:
            client.close()
    return measured


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.callgrind", description=__doc__)
    parser.add_argument("--mode", choices=("bare", "governed"), default="bare")
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated")
    parser.add_argument("--requests", type=int, default=400, help="measured, per kind")
    parser.add_argument("--top", type=int, default=25, help="functions shown per kind")
    parser.add_argument("--out", type=Path, help="keep the dumps here (default: not kept)")
    args = parser.parse_args(argv)
    kinds = args.kinds.split(",")
    unknown = set(kinds) - set(KINDS)
    if unknown:
        parser.error(f"unknown kinds {sorted(unknown)}; known: {list(KINDS)}")
    with tempfile.TemporaryDirectory(prefix="morngpt-cg-") as tmp:
        workdir = Path(tmp)
        out = (args.out or workdir / "kept").resolve()
        out.mkdir(parents=True, exist_ok=True)
        canned, upstream = nginx.start(workdir, None, CHAT_TOKENS, KIND_TOKENS.values())
        try:
            with served(workdir, args.mode, upstream) as (proxy, port):
                measured = measure(proxy.pid, port, args.mode, kinds, args.requests, workdir, out)
        finally:
            canned.stop()
        for kind, total, dump in measured:
            print(f"\n## {args.mode}, {kind}: {total:,} instructions a request")
            print("(the event loop's thread, per request)\n")
            print("\n".join(table(dump, args.requests, args.top)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

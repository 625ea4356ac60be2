"""Processes under test: start them pinned to CPUs, wait until they listen, read their
CPU time and memory from /proc, stop them.

CPU seconds are utime + stime of every process in the tree (a multi-worker proxy is a
supervisor plus its workers), read before and after a load run; the difference divided
by the requests served is the proxy's CPU cost per request, whoever the load generator
is. Linux only (/proc).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Layout:
    """Which CPUs the load generator, the upstream and the proxy run on (None: any)."""

    load: frozenset[int] | None
    upstream: frozenset[int] | None
    proxy: frozenset[int] | None
    note: str
    every: frozenset[int] = frozenset()

    @classmethod
    def for_machine(cls) -> Layout:
        cpus = sorted(os.sched_getaffinity(0))
        every = frozenset(cpus)
        if len(cpus) >= 3:
            first, second, rest = {cpus[0]}, {cpus[1]}, set(cpus[2:])
            return cls(
                frozenset(first),
                frozenset(second),
                frozenset(rest),
                f"load on CPU {cpus[0]}, upstream on CPU {cpus[1]}, proxy on CPUs {sorted(rest)}",
                every,
            )
        if len(cpus) == 2:
            shared, own = frozenset({cpus[0]}), frozenset({cpus[1]})
            return cls(
                shared,
                shared,
                own,
                f"load generator and upstream share CPU {cpus[0]}; "
                f"the proxy (one worker) has CPU {cpus[1]} to itself",
                every,
            )
        return cls(None, None, None, "one CPU: nothing pinned", every)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(argv: Sequence[str], cpus: frozenset[int] | None) -> list[str]:
    """``argv`` run under ``taskset`` when ``cpus`` is given."""
    if cpus is None:
        return list(argv)
    return ["taskset", "-c", ",".join(map(str, sorted(cpus))), *argv]


class Service:
    """A server subprocess: started in its own process group, stopped with SIGTERM."""

    def __init__(
        self, name: str, argv: Sequence[str], cwd: Path, log: Path, root: Path = ROOT
    ) -> None:
        """``root``: the tree whose modules the process imports (another tree's compiled
        copy, for ``bench.ab``)."""
        self.name = name
        self.log = log
        env = dict(os.environ, PYTHONPATH=str(root), PYTHONUNBUFFERED="1")
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                list(argv),
                cwd=cwd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_for(self, text: str, count: int = 1, timeout: float = 30.0) -> None:
        """Block until ``text`` appeared ``count`` times in the log (e.g. one
        "listening" line per worker), or fail with the log's tail."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.tail()}")
            if self.log.read_text(errors="replace").count(text) >= count:
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready after {timeout:g}s: {self.tail()}")

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def pids(self) -> list[int]:
        return [self.pid, *descendants(self.pid)]

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait()


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children of children included)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int(_stat_fields(int(entry.name))[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _stat_fields(pid: int) -> list[str]:
    # The command name (field 2) may hold spaces; everything after its ")" splits.
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rindex(")") + 2 :].split()


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of ``pids``, in seconds (processes that are gone count 0)."""
    ticks = 0
    for pid in pids:
        try:
            fields = _stat_fields(pid)
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return ticks / _TICKS


def preempted(pids: Sequence[int]) -> int:
    """Times ``pids`` were switched out while they could still run (the kernel's
    ``nonvoluntary_ctxt_switches``): more processes busy than CPUs."""
    count = 0
    for pid in pids:
        try:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            if line.startswith("nonvoluntary_ctxt_switches:"):
                count += int(line.split()[1])
    return count


def rss_mb(pids: Sequence[int]) -> list[float]:
    """Resident memory of each process in ``pids``, in MB."""
    sizes = []
    for pid in pids:
        try:
            resident = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        except OSError:
            continue
        sizes.append(resident * _PAGE / 1e6)
    return sizes


def debian_tool(command: str, package: str) -> str:
    """Path of ``command``, installing Debian's ``package`` first when it is missing."""
    found = shutil.which(command)
    if found:
        return found
    print(f"{command} not found: apt-get install -y {package}", flush=True)
    # Bounded: a package mirror that accepts and never answers must not hang the bench.
    subprocess.run(["apt-get", "update", "-qq"], check=True, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-qq", package], check=True, timeout=600)
    found = shutil.which(command)
    if not found:
        raise RuntimeError(f"{command} is still missing after apt-get install {package}")
    return found


def python() -> str:
    return sys.executable


def peak_rss_mb(pids: Sequence[int]) -> list[float]:
    """Each process's peak resident memory so far (VmHWM), in MB."""
    peaks = []
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                peaks.append(int(line.split()[1]) * 1024 / 1e6)
    return peaks

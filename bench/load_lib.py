"""Shared parts of the HTTP load benchmarks (load_bench.py, mixed_load.py, cache_growth.py): build
and serve a run with ``influence serve`` in a subprocess, a minimal asyncio keep-alive HTTP/1.1
client, and the machine description written with every result."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEALTH = "/api/v1/health"
HEALTH_TIMEOUT_S = 120.0
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# run and server


def ensure_run(run: Path, model: str) -> None:
    """Build ``run`` (digits, ``model``) in a subprocess unless it already exists."""
    if run.exists():
        return
    print(f"building {run} (digits, {model}) ...", file=sys.stderr, flush=True)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "app.cli", "build", "--data", "digits", "--model", model,
                    "--out", str(run), "--quiet"], check=True, cwd=ROOT)
    print(f"built {run} in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, port: int, log, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``influence serve`` in a subprocess (``env`` added to this one's), its output to ``log``."""
    return subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--run", str(run),
                             "--host", "127.0.0.1", "--port", str(port)],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})


def wait_healthy(proc: subprocess.Popen, port: int, timeout: float = HEALTH_TIMEOUT_S) -> dict:
    """Poll the health route until it answers 200; return its JSON."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{HEALTH}", timeout=2) as r:
                if r.status == 200:
                    return json.loads(r.read())
        except OSError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"server not healthy after {timeout:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------------------------
# a minimal keep-alive HTTP/1.1 client


class Connection:
    """One persistent connection; :meth:`get` returns (status, headers, body). A GET on a reused
    connection that the server closed meanwhile (it does after a 500) is sent again once on a new
    connection, as HTTP clients do; ``reconnects`` counts those."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.reconnects = 0

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
            self.reader = self.writer = None

    async def get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        return await self.request("GET", path)

    async def request(self, method: str, path: str, body: bytes = b"",
                      headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """One request (a GET is resent once if the reused connection was closed meanwhile)."""
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        for name, value in (headers or {}).items():
            head += f"{name}: {value}\r\n"
        if body or method != "GET":
            head += f"Content-Length: {len(body)}\r\n"
        data = (head + "\r\n").encode("latin-1") + body
        reused = self.writer is not None
        if not reused:
            await self.open()
        try:
            status_line = await self._send(data)
        except (ConnectionError, asyncio.IncompleteReadError):
            if not reused or method != "GET":
                raise
            self.reconnects += 1
            await self.close()
            await self.open()
            status_line = await self._send(data)
        return await self._read_rest(int(status_line.split(b" ", 2)[1]))

    async def _send(self, data: bytes) -> bytes:
        """Write the request; return the response's status line."""
        assert self.reader is not None and self.writer is not None
        self.writer.write(data)
        await self.writer.drain()
        return await self.reader.readuntil(b"\r\n")

    async def _read_rest(self, status: int) -> tuple[int, dict[str, str], bytes]:
        assert self.reader is not None
        headers = {}
        while (line := await self.reader.readuntil(b"\r\n")) != b"\r\n":
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        else:  # no length (not expected from uvicorn): the body runs to the end of the connection
            body = await self.reader.read()
            headers["connection"] = "close"
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, headers, body


# ---------------------------------------------------------------------------------------------
# the machine, written with every result


def machine() -> dict:
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = None
    return {"platform": platform.platform(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "torch": torch_version}

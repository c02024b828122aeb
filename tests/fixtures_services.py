"""Real infrastructure for tests: redis-server and nginx on free loopback ports, temp dirs
(tests/sources adds mosquitto with the same helpers).

Each starts the Debian binary in the foreground, waits for it by asking it (PING, a TCP
connect), and is killed and reaped afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import free_port, start_server


def need(binary: str) -> str:
    path = shutil.which(binary) or (f"/usr/sbin/{binary}" if Path(f"/usr/sbin/{binary}").exists() else None)
    if path is None:
        pytest.fail(f"{binary} is not installed (make system-deps)", pytrace=False)
    return path


def wait_tcp(port: int, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + 20
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited early:\n{log.read_text()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not listen on {port}:\n{log.read_text()}")
        time.sleep(0.02)  # readiness poll, bounded by the deadline


@contextlib.contextmanager
def redis_server(tmp: Path, port: int | None = None) -> Iterator[str]:
    """A throw-away redis-server; yields its redis:// URL."""
    exe = need("redis-server")
    port = port or free_port()
    d = tmp / f"redis-{port}"
    d.mkdir()
    log = d / "redis.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(d),
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_tcp(port, proc, "redis-server", log)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill()
        proc.wait(timeout=10)


NGINX_CONF = """
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
  upstream lookback {{
{servers}
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://lookback;
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection $connection_upgrade;
      proxy_read_timeout 300s;
      proxy_next_upstream error timeout http_502 http_503;
      proxy_connect_timeout 1s;
    }}
  }}
}}
"""


@contextlib.contextmanager
def nginx_proxy(tmp: Path, upstream_ports: list[int]) -> Iterator[str]:
    """nginx round-robin (no stickiness) in front of ``upstream_ports``; yields its http:// URL."""
    exe = need("nginx")
    port = free_port()
    d = tmp / f"nginx-{port}"
    d.mkdir()
    servers = "\n".join(f"    server 127.0.0.1:{p} max_fails=0;" for p in upstream_ports)
    conf = d / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=d, port=port, servers=servers))
    log = d / "stdout.log"
    with log.open("wb") as out:
        # its own process group: nginx forks workers, and killing the master alone orphans them
        proc = subprocess.Popen(
            [exe, "-c", str(conf), "-p", str(d)], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_tcp(port, proc, "nginx", d / "error.log" if (d / "error.log").exists() else log)
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def start_lookback(tmp: Path, port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """``lookback serve`` on a given port (a replica restarted behind a fixed upstream)."""
    return start_server(tmp / f"replica-{port}-{time.monotonic_ns()}.log", port, env)

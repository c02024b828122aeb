"""What one load run is: ``LoadConfig``, the limits that bound it, and its URL checks."""

from __future__ import annotations

import ipaddress
import math
import socket
import sys
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlsplit

FRAME = 128
SAMPLE_RATE = 16000
FRAME_SECONDS = FRAME / SAMPLE_RATE  # 8 ms
SESSIONS_PER_PROC = 150  # at 1 frame/message: ~19k sends + ~19k results per second
CLIENT_CPU_LIMIT = 0.85  # a client process above this share of a core may be the bottleneck
SLIP_LIMIT_S = 0.002  # p99 send lateness above this: the schedule is slipping
MAX_AUDIO_SECONDS = 60.0  # the looped clip is cut to this (pre-built messages stay small)
WRITE_BUFFER_LIMIT = 256 * 1024  # a session whose socket the server stopped reading skips sends
MAX_SESSIONS = 20000  # bounded in count ...
MAX_SECONDS = 3600.0  # ... and in time
VERIFY_TOLERANCE = 1e-5  # streamed scores against /v1/score's (another graph): the README's bound


class LoadtestError(Exception):
    """Bad arguments or a run that could not start."""


@dataclass
class LoadConfig:
    urls: list[str] = field(default_factory=lambda: ["ws://127.0.0.1:8000"])
    sessions: int = 100
    duration: float = 10.0  # measured seconds, after the warm-up
    warmup: float = 2.0  # seconds sent but not measured
    wav: str | None = None  # None: synthetic noise
    model: str | None = None
    version: str | None = None
    frames_per_message: int = 1
    procs: int = 0  # 0: see proc_count
    p99_ms: float = 20.0  # latency bound: frames later than this are late; ramp's p99 bound
    api_key: str | None = None
    client: str = "raw"  # raw | websockets
    connect_timeout: float = 15.0
    connect_concurrency: int = 32  # handshakes in flight per process
    end_timeout: float = 10.0  # after the last send: wait this long for every summary
    fail_fast: bool = False  # a process whose p99 is over the bound already waits <= 1 s
    allow_remote: bool = False
    cpus: list[int] | None = None  # pin the client processes to these CPUs
    results: str = "all"  # all | batch (one `results` message per model call) | events
    result_format: str = "json"  # json | binary (protocol.BINARY_RESULTS)
    resumable: bool = False  # ?resumable=1: the server checkpoints every session (docs/sessions.md)
    # The wire form: pcm_s16le at the model's rate by default; another encoding (pcm_f32le,
    # G.711 mulaw/alaw) and/or sample_rate puts the server's decoder and resampler under load.
    encoding: str = "pcm_s16le"
    sample_rate: int | None = None  # None: the model's (16 kHz), sent without the query parameter
    message_ms: int = 20  # per message when the form is not PCM at 16 kHz (whole frames are)
    seed: int = 0
    quiet: bool = False
    # sessions whose scores are checked against /v1/score after the run (loadtest.verify);
    # 0 for a server without the REST endpoint (the benches' echo servers)
    verify: int = 0


# ------------------------------------------------------------------------------------------
# The wire form


ENCODINGS = ("pcm_s16le", "pcm_f32le", "mulaw", "alaw")
RATES = (8000, 16000, 22050, 24000, 32000, 44100, 48000)  # engine.pcm.SAMPLE_RATES


def wire_rate(cfg: LoadConfig) -> int:
    return cfg.sample_rate or SAMPLE_RATE


def whole_frames(cfg: LoadConfig) -> bool:
    """PCM at the model's rate: messages of whole frames, as today. Otherwise (G.711, another
    rate) messages of ``message_ms`` ms, and the server decodes/resamples into frames."""
    return cfg.encoding in ("pcm_s16le", "pcm_f32le") and wire_rate(cfg) == SAMPLE_RATE


def message_samples(cfg: LoadConfig) -> int:
    """Wire samples a message carries."""
    if whole_frames(cfg):
        return cfg.frames_per_message * FRAME
    return wire_rate(cfg) * cfg.message_ms // 1000


def message_seconds(cfg: LoadConfig) -> float:
    """The send period of a session."""
    if whole_frames(cfg):
        return cfg.frames_per_message * FRAME_SECONDS
    return message_samples(cfg) / wire_rate(cfg)


def message_frames(cfg: LoadConfig) -> float:
    """A message's duration in 8 ms frames (``frames_per_message`` when framed; 20 ms: 2.5)."""
    if whole_frames(cfg):
        return cfg.frames_per_message
    return cfg.message_ms / (FRAME_SECONDS * 1000)


# ------------------------------------------------------------------------------------------
# URLs, query and headers


def split_url(url: str) -> tuple[str, int, str]:
    u = urlsplit(url if "://" in url else f"ws://{url}")
    if u.scheme not in ("ws", "http"):
        raise LoadtestError(f"{url}: only ws:// (or http://) URLs are supported")
    host = u.hostname or "127.0.0.1"
    port = u.port or 80
    path = u.path.rstrip("/")
    if not path.endswith("/v1/stream"):
        path += "/v1/stream"
    return host, port, path


def http_base(url: str) -> str:
    host, port, _ = split_url(url)
    h = f"[{host}]" if ":" in host else host
    return f"http://{h}:{port}"


def is_loopback(host: str) -> bool:
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def check_urls(cfg: LoadConfig) -> None:
    if not cfg.urls:
        raise LoadtestError("no URL")
    for url in cfg.urls:
        host, _, _ = split_url(url)
        if not cfg.allow_remote and not is_loopback(host):
            raise LoadtestError(
                f"{host} is not a loopback address; a load test is for your own "
                "machine (pass --allow-remote to load another host)"
            )
    if cfg.frames_per_message < 1:
        raise LoadtestError("frames_per_message must be >= 1")
    if not 1 <= cfg.sessions <= MAX_SESSIONS:
        raise LoadtestError(f"sessions must be between 1 and {MAX_SESSIONS}")
    if not (0 < cfg.duration <= MAX_SECONDS and 0 <= cfg.warmup <= MAX_SECONDS):
        raise LoadtestError(f"duration must be in (0, {MAX_SECONDS:g}] s, warmup in [0, {MAX_SECONDS:g}] s")
    if cfg.client not in ("raw", "websockets"):
        raise LoadtestError("client must be raw or websockets")
    if cfg.results not in ("all", "batch", "events"):
        raise LoadtestError("results must be all, batch or events")
    if cfg.result_format not in ("json", "binary"):
        raise LoadtestError("result_format must be json or binary")
    if cfg.verify < 0:
        raise LoadtestError("verify must be >= 0")
    if cfg.encoding not in ENCODINGS:
        raise LoadtestError(f"encoding must be one of {', '.join(ENCODINGS)}")
    if cfg.sample_rate is not None and cfg.sample_rate not in RATES:
        raise LoadtestError(f"sample_rate must be one of {', '.join(str(r) for r in RATES)}")
    if not whole_frames(cfg) and (cfg.message_ms < 1 or wire_rate(cfg) * cfg.message_ms % 1000):
        raise LoadtestError(f"message_ms must be a whole number of samples at {wire_rate(cfg)} Hz")


def query_string(cfg: LoadConfig) -> str:
    q = {"model": cfg.model, "version": cfg.version, "encoding": cfg.encoding, "results": cfg.results}
    if cfg.sample_rate is not None:
        q["sample_rate"] = str(cfg.sample_rate)
    if cfg.resumable:
        q["resumable"] = "1"
    if cfg.result_format != "json":
        q["result_format"] = cfg.result_format
    return urlencode({k: v for k, v in q.items() if v is not None})


def auth_headers(cfg: LoadConfig) -> dict[str, str]:
    return {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}


def log(cfg: LoadConfig, text: str) -> None:
    if not cfg.quiet:
        print(text, file=sys.stderr, flush=True)


def sessions_per_proc(frames_per_message: float) -> int:
    """SESSIONS_PER_PROC at 1 frame/message; more with bigger messages at the same message load
    (a session sends 125/k messages and gets up to 125 results per second). ``k`` is in
    8 ms frames (20 ms messages: 2.5)."""
    k = max(1, frames_per_message)
    return int(SESSIONS_PER_PROC * 2 / (1 + 1 / k))


def proc_count(cfg: LoadConfig) -> int:
    per = sessions_per_proc(message_frames(cfg))
    return max(1, min(cfg.sessions, cfg.procs or math.ceil(cfg.sessions / per)))

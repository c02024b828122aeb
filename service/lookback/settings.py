"""All configuration in one place: every knob is a ``LOOKBACK_*`` env var (or ``.env`` line).

The same object is passed into ``create_app`` so tests build servers with explicit
settings instead of patching globals.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

_REPO_STORE = Path(__file__).resolve().parents[2] / "model_store"


def _csv(value: object) -> object:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LOOKBACK_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    # --- server -------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="bind address; 0.0.0.0 in containers")
    port: int = Field(8000, ge=0, le=65535, description="listen port")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="debug also enables the access log"
    )
    ws_impl: Literal["auto", "websockets", "websockets-sansio", "wsproto"] = Field(
        "websockets-sansio",
        description="websockets-sansio: uvicorn's handshake, then Lookback's framing and direct path "
        "(lookback.websocket); another value runs uvicorn's own protocol (ASGI path, fewer guards)",
    )
    ws_per_message_deflate: bool = Field(
        False, description="PCM barely compresses and deflate costs ~27% per small message"
    )
    ws_ping_interval_s: float | None = Field(20.0, description="uvicorn keep-alive pings; None off")
    workers: int | Literal["auto"] = Field(
        1,
        description="worker processes on one port (docs/workers.md); auto: one per CPU this "
        "process may use (affinity, cgroup quota). Session and offline limits stay per server "
        "(docs/workers.md)",
    )
    worker_socket: Literal["reuseport", "shared"] = Field(
        "reuseport",
        description="--workers N: reuseport, a listening socket per worker, the kernel spreads "
        "connections evenly; shared: one socket all workers accept from (bursts land on one)",
    )

    # --- models ---------------------------------------------------------------------------
    model_store: Path = Field(_REPO_STORE, description="folder of <name>/<version>/model.json")
    default_model: str = Field("lookback-vad", description="model used when a client names none")
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="models to load as name or name/version (comma-separated); empty: all",
    )
    providers: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA when it loads, CPU otherwise"
    )
    intra_op_threads: int = Field(1, ge=0, description="ORT threads per model call; 0 = ORT default")
    inter_op_threads: int = Field(1, ge=0, description="ORT inter-op threads")

    # --- batching -------------------------------------------------------------------------
    max_batch_size: int = Field(256, ge=1, description="steps per model call at most")
    max_steps_per_call: int = Field(
        16,
        ge=1,
        le=256,
        description="ready hops of one session one model call may take (multi-step graph); "
        "1: one hop per call",
    )
    max_wait_ms: float = Field(
        2.0,
        ge=0.0,
        description="hold a small batch up to this long (from its oldest step) to fill it; "
        "0: greedy. Never waits once every open session has a step ready",
    )
    adaptive_wait: bool = Field(
        True,
        description="grow the fill wait with load: none while the process uses under half a "
        "core, max_wait_ms from 90%; false: every small batch may wait max_wait_ms",
    )
    batch_fill_rows: int = Field(
        64,
        ge=1,
        description="a batch waiting to fill starts once it has this many steps: past about "
        "64 rows a model call's cost per row no longer falls (CPU)",
    )
    model_calls: Literal["auto", "thread", "inline"] = Field(
        "auto",
        description="where CPU model calls run: thread (overlaps the event loop on another "
        "core), inline (on the event loop: no hand-off, best on one core); auto: inline when "
        "the process may use one CPU only",
    )
    warmup_batch_sizes: Annotated[list[int], NoDecode] = Field(
        default_factory=lambda: [1, 8, 64], description="batch sizes run once at load"
    )
    initial_slots: int = Field(64, ge=1, description="state-table rows allocated at start")
    gc_freeze: bool = Field(
        True,
        description="once started, freeze what start-up loaded out of the cycle collector, so "
        "full collections skip it (they stopped the event loop for 30-60 ms)",
    )

    # --- limits ---------------------------------------------------------------------------
    max_sessions: int = Field(1000, ge=1, description="open WebSocket sessions per server")
    max_message_bytes: int = Field(64 * 1024, ge=256, description="largest binary message")
    max_frames_per_message: int = Field(64, ge=1, description="128-sample frames in one message")
    max_pending_steps: int = Field(
        64,
        ge=1,
        description="steps one session may queue; past it the server stops reading that socket "
        "(TCP backpressure) instead of dropping audio",
    )
    send_queue_messages: int = Field(
        1024, ge=8, description="results waiting for a slow reader before its session is closed"
    )
    idle_timeout_s: float = Field(60.0, gt=0, description="close a session silent this long")
    max_session_s: float = Field(4 * 3600.0, gt=0, description="close a session open this long")
    shed_backlog_steps: int = Field(
        4096, ge=1, description="refuse new sessions while this many steps wait for the batcher"
    )
    max_upload_bytes: int = Field(512 * 1024 * 1024, ge=1024, description="REST body size limit (413)")
    max_upload_seconds: float = Field(4 * 3600.0, gt=0, description="REST audio duration limit (413)")
    max_concurrent_scores: int = Field(2, ge=1, description="offline clips scored at once")
    max_queued_scores: int = Field(8, ge=0, description="offline clips waiting; more get 503")
    offline_chunk_steps: int = Field(2048, ge=1, description="steps scored per offline chunk")
    drain_grace_s: float = Field(
        20.0, ge=0, description="SIGTERM: the process exits within this, stuck clients or not"
    )
    max_float_amplitude: float = Field(
        4.0,
        ge=1.0,
        description="pcm_f32le and float WAV samples must lie in [-this, this] (full scale is 1.0; "
        "the default allows 12 dB of headroom); larger is refused: audio_out_of_range",
    )

    # --- transport (HTTP before the upgrade, WebSocket sends) ---------------------------
    max_connections: int | None = Field(
        None,
        ge=1,
        description="open connections past their request head (sessions, requests) before new "
        "requests get 503 server_busy (health, readiness and metrics are always answered); "
        "default max_sessions + the scoring places + 64",
    )
    max_pending_connections: int = Field(
        256,
        ge=1,
        description="connections that have not sent a whole request head (new, slow, idle between "
        "keep-alive requests): they never count against max_connections; past this many, the "
        "oldest of the client address holding the most is closed (408 header_timeout)",
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="a request's line and headers must arrive within this: header_timeout"
    )
    keep_alive_timeout_s: int = Field(5, ge=1, description="close an idle keep-alive HTTP connection")
    max_request_line_bytes: int = Field(
        8192,
        ge=1024,
        le=8192,
        description="request line (method, path, query), 414 request_line_too_long; and any one "
        "header line, 431 headers_too_large (the WebSocket handshake parser allows 8 KiB lines)",
    )
    max_header_bytes: int = Field(
        32 * 1024, ge=1024, description="the request head in all: 431 headers_too_large"
    )
    max_headers: int = Field(100, ge=8, description="header lines in one request: headers_too_large")
    ws_send_timeout_s: float = Field(
        10.0,
        gt=0,
        description="a WebSocket whose client reads nothing for this long while the server has "
        "results to send is dropped; it also bounds the close handshake",
    )
    min_upload_rate_bps: int = Field(
        16 * 1024,
        ge=0,
        description="REST bodies slower than this on average (after upload_rate_grace_s) get "
        "408 upload_too_slow; 0 off",
    )
    upload_rate_grace_s: float = Field(5.0, gt=0, description="time before min_upload_rate_bps applies")
    response_send_timeout_s: float = Field(
        30.0, gt=0, description="a streamed (ndjson) answer whose client stops reading is cut: send_timeout"
    )

    # --- sessions that survive (docs/sessions.md) ----------------------------------------
    resume_enabled: bool = Field(True, description="issue resume tokens and checkpoint sessions")
    state_store: str = Field(
        "memory",
        description="where snapshots live: memory (this process) or redis://host:port/db (shared)",
    )
    resume_window_s: float = Field(120.0, gt=0, description="how long a dropped session can be resumed")
    snapshot_interval_s: float = Field(
        0.25, gt=0, description="checkpoint period: audio a crash can lose, which the client replays"
    )
    resume_lease_s: float = Field(
        1.5, gt=0, description="a session's owner lease; a crashed owner's session is free after it"
    )
    resume_tail_messages: int = Field(
        128,
        ge=0,
        description="recent results kept in each snapshot and re-sent on resume: covers the "
        "results a dropped connection lost in flight",
    )
    resume_tombstone_s: float = Field(
        3600.0, gt=0, description="how long a token is still told apart as expired or used"
    )
    resume_secret: SecretStr | None = Field(
        None,
        description="key of resume-token and snapshot MACs, the same on every replica (e.g. from a "
        "Kubernetes Secret); unset: a key the replicas share through the state store, which an "
        "empty store restart can replace (docs/sessions.md)",
    )
    session_events_kept: int = Field(
        1000,
        ge=0,
        description="events a stream session keeps for its summary and snapshots (the last N; "
        "older ones are counted in the summary's events_truncated): bounds memory per session",
    )

    # --- broker sources (docs/sources.md) --------------------------------------------------
    sources: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="broker sources consumed by `lookback serve` (comma-separated URLs): "
        "redis://host:port/db?stream=lookback:audio&partitions=16&group=lookback, "
        "mqtt://host:port?prefix=lookback, kafka://host:port/topic?group=lookback",
    )
    source_model: str = Field(
        "", description="model of a device whose messages name none; empty: default_model"
    )
    source_idle_timeout_s: float = Field(
        60.0, gt=0, description="close a device session silent this long and publish its summary"
    )
    source_gap_policy: Literal["zero_fill", "reset"] = Field(
        "zero_fill",
        description="missing sequence numbers: zero_fill keeps time with silence, reset ends the "
        "session and starts a new one",
    )
    source_max_gap_fill_s: float = Field(
        10.0, ge=0, description="a gap longer than this is handled as reset even under zero_fill"
    )
    source_max_inflight: int = Field(
        4096, ge=1, description="messages read and not yet committed; past it the consumer reads no more"
    )
    source_device_queue: int = Field(
        32,
        ge=1,
        description="messages queued for one device; more are held aside (within source_max_inflight) "
        "while reading goes on, so a device's backlog does not hold up its neighbours",
    )
    source_lease_s: float = Field(
        3.0, gt=0, description="Redis Streams partition lease: a dead consumer's partitions move after it"
    )
    source_checkpoint_ttl_s: float = Field(
        7 * 86400.0, gt=0, description="how long a silent device's checkpoint (last sequence, state) is kept"
    )

    source_kafka_config: dict[str, str] = Field(
        default_factory=dict,
        description="librdkafka settings for kafka:// sources, as JSON (e.g. security.protocol, "
        "sasl.mechanism, sasl.username, sasl.password, ssl.ca.location); the source URL's "
        "dotted query parameters override them",
    )
    consume_metrics_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="`lookback consume` serves /metrics, /healthz and /readyz on this port; 0: off",
    )
    consume_metrics_host: str = Field(
        "0.0.0.0", description="address `lookback consume` serves /metrics, /healthz and /readyz on"
    )

    # --- security -------------------------------------------------------------------------
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="comma-separated; empty disables auth"
    )
    metrics_require_auth: bool = Field(False, description="require the API key on /metrics")
    allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="browser Origins allowed on /v1/stream; empty: any"
    )
    demo_enabled: bool = Field(True, description="serve the browser demo at /demo/")

    @field_validator("models", "sources", "allowed_origins", "api_keys", "warmup_batch_sizes", mode="before")
    @classmethod
    def _split_csv(cls, value: object) -> object:
        return _csv(value)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys_not_blank(cls, value: object) -> object:
        """A key list that was set but holds no key (``","``) would turn auth off silently."""
        if isinstance(value, str) and value.strip() and not _csv(value):
            raise ValueError("api_keys is set but holds no key; unset it to run without auth")
        return value

    @field_validator("resume_secret")
    @classmethod
    def _secret_long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        """A short secret makes forgeable tokens; an empty one is a mistake, not 'unset'."""
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("resume_secret must be at least 16 characters (e.g. openssl rand -hex 32)")
        return value

    @field_validator("workers")
    @classmethod
    def _workers_positive(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("workers must be at least 1, or auto")
        return value

    @model_validator(mode="after")
    def _limits_consistent(self) -> Settings:
        if self.max_frames_per_message > self.max_pending_steps:
            # A message may make one step per frame (hop 128): it must fit the step bound.
            raise ValueError("max_frames_per_message must not exceed max_pending_steps")
        if self.max_message_bytes < self.max_frames_per_message * 128 * 2:
            raise ValueError("max_message_bytes is below max_frames_per_message int16 frames")
        return self

    @property
    def connection_limit(self) -> int:
        return self.max_connections or (
            self.max_sessions + self.max_concurrent_scores + self.max_queued_scores + 64
        )

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)

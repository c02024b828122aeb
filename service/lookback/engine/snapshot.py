"""Session snapshots: a stream's complete state as bytes, restorable bit-identically.

Everything a ``StreamSession`` carries from one step to the next is declared by its
model: the state rows and the context row in the ``StateTable``, the partial hop not yet
scored, the event detector, the step and sample counters. A snapshot holds exactly
those, so restoring it into a fresh slot of any process that serves the same graph and
streaming the rest of the audio gives the same results, bit for bit, as the stream that
was never interrupted.

A snapshot is taken only when the session is idle (no step queued or in flight): then
the slab rows are the state after ``steps`` steps and nothing is half-applied. Every
accepted sample is then either in the state or in the partial hop, so ``frames`` (whole
128-sample frames received) says where a client must resume sending.

Layout (little-endian)::

    b"LBSS" | u16 format | u32 header length | header (JSON) | row bytes... | partial hop | u32 crc32

The header names the model (name, version, graph sha256), the counters, the detector and
each row's name, dtype and shape. Decoding checks everything: magic, format version,
lengths, the checksum, every counter's range, and that every row matches what the
serving model declares; a snapshot never restores into a different graph.

What a state store holds is the snapshot *sealed* (``seal``/``unseal``)::

    b"LBSM" | key id (8 ASCII) | HMAC-SHA256(key, context | key id | snapshot) | snapshot

The context is the session id and the API key's fingerprint: a snapshot copied to
another session's entry, or edited in the store, is refused before it is parsed.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from lookback.engine.slabs import CONTEXT
from lookback.errors import SnapshotError

if TYPE_CHECKING:
    from lookback.engine.served import ServedModel

MAGIC = b"LBSS"
FORMAT_VERSION = 2  # 2: events_truncated, sealed in the store (format 1 is refused)
_PREFIX = struct.Struct("<4sHI")
_CRC = struct.Struct("<I")
_MAX_HEADER = 1 << 22  # a header is a few hundred bytes plus the (bounded) events list
MAX_COUNT = (1 << 53) - 1  # counters above this are not a real stream (and break JSON)
ENCODINGS = ("pcm_s16le", "pcm_f32le")
SEAL_MAGIC = b"LBSM"
_SEAL = struct.Struct("<4s8s32s")  # magic, key id, MAC


@dataclass
class Snapshot:
    """The decoded value; ``rows`` are batch-first rows as the StateTable stores them."""

    model: str
    version: str
    graph_sha256: str
    encoding: str
    steps: int  # steps scored (== steps made: snapshots are taken idle)
    frames: int  # whole frames received, i.e. frames * frame_samples client samples
    frame_samples: int
    padded_samples: int
    failed_steps: int
    detector: tuple[bool, bool, int, int]  # triggered, pending, temp_end, start
    events: list[tuple[str, str, int]]  # (start|end, label, sample)
    partial: bytes  # the partial hop, in ``encoding``
    rows: dict[str, np.ndarray]
    options: dict[str, str] = field(default_factory=dict)  # transport options (results mode)
    events_truncated: int = 0  # events older than ``events`` the session no longer keeps
    # the client's encoding and rate when they are not the model's (engine/decoder.py):
    # then ``encoding`` and ``partial`` are the decoder's float32 output
    decoder: dict[str, Any] | None = None

    @property
    def samples(self) -> int:
        """Client samples consumed into this snapshot: where a resumed client restarts."""
        if self.decoder is not None:
            return _nat(self.decoder.get("received", -1))
        return self.frames * self.frame_samples

    def encode(self) -> bytes:
        blobs = []
        row_meta = []
        for name, arr in self.rows.items():
            a = np.ascontiguousarray(arr)
            row_meta.append([name, a.dtype.str, list(a.shape), a.nbytes])
            blobs.append(a.tobytes())
        header = orjson.dumps(
            {
                "model": self.model,
                "version": self.version,
                "graph_sha256": self.graph_sha256,
                "encoding": self.encoding,
                "steps": self.steps,
                "frames": self.frames,
                "frame_samples": self.frame_samples,
                "padded_samples": self.padded_samples,
                "failed_steps": self.failed_steps,
                "detector": list(self.detector),
                "events": [list(e) for e in self.events],
                "events_truncated": self.events_truncated,
                "partial": len(self.partial),
                "rows": row_meta,
                "options": self.options,
                **({} if self.decoder is None else {"decoder": self.decoder}),
            }
        )
        body = b"".join([_PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)), header, *blobs, self.partial])
        return body + _CRC.pack(zlib.crc32(body))


def decode(data: bytes) -> Snapshot:
    """Parse and check a snapshot; SnapshotError says what is wrong (never a crash)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise SnapshotError("snapshot must be bytes")
    data = bytes(data)
    if len(data) < _PREFIX.size + _CRC.size:
        raise SnapshotError(f"snapshot truncated: {len(data)} bytes")
    magic, fmt, hlen = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise SnapshotError("not a Lookback session snapshot (bad magic)")
    if fmt != FORMAT_VERSION:
        raise SnapshotError(
            f"snapshot format version {fmt}; this server reads version {FORMAT_VERSION}",
            code="snapshot_version",
        )
    (crc,) = _CRC.unpack_from(data, len(data) - _CRC.size)
    if zlib.crc32(data[: -_CRC.size]) != crc:
        raise SnapshotError("snapshot damaged or truncated (checksum mismatch)")
    if hlen > _MAX_HEADER or _PREFIX.size + hlen > len(data) - _CRC.size:
        raise SnapshotError("snapshot header length out of range")
    try:
        h = orjson.loads(data[_PREFIX.size : _PREFIX.size + hlen])
        pos = _PREFIX.size + hlen
        rows: dict[str, np.ndarray] = {}
        for name, dtype, shape, nbytes in h["rows"]:
            dt = np.dtype(dtype)
            shp = tuple(int(d) for d in shape)
            if int(np.prod(shp)) * dt.itemsize != nbytes or pos + nbytes > len(data) - _CRC.size:
                raise SnapshotError(f"snapshot row {name!r} has an inconsistent size")
            rows[str(name)] = np.frombuffer(data, dt, count=int(np.prod(shp)), offset=pos).reshape(shp).copy()
            pos += nbytes
        plen = int(h["partial"])
        if pos + plen != len(data) - _CRC.size:
            raise SnapshotError("snapshot length does not match its header")
        triggered, pending, temp_end, start = h["detector"]
        encoding = h["encoding"]
        if encoding not in ENCODINGS:
            raise SnapshotError(f"snapshot encoding {str(encoding)[:20]!r} is not one this server reads")
        events = [(k, str(lab), _nat(s)) for k, lab, s in h["events"]]
        if any(k not in ("start", "end") for k, _, _ in events):
            raise SnapshotError("snapshot events must be start or end")
        snap = Snapshot(
            model=str(h["model"]),
            version=str(h["version"]),
            graph_sha256=str(h["graph_sha256"]),
            encoding=encoding,
            steps=_nat(h["steps"]),
            frames=_nat(h["frames"]),
            frame_samples=_nat(h["frame_samples"]),
            padded_samples=_nat(h["padded_samples"]),
            failed_steps=_nat(h["failed_steps"]),
            detector=(bool(triggered), bool(pending), _nat(temp_end), _nat(start)),
            events=events,
            partial=data[pos : pos + plen],
            rows=rows,
            options={str(k): str(v) for k, v in dict(h.get("options") or {}).items()},
            events_truncated=_nat(h["events_truncated"]),
            decoder=_decoder(h.get("decoder")),
        )
        if snap.failed_steps > snap.steps:
            raise SnapshotError("snapshot counts more failed steps than steps")
    except SnapshotError:
        raise
    except (KeyError, TypeError, ValueError, orjson.JSONDecodeError) as exc:
        raise SnapshotError(f"snapshot header is malformed: {exc}") from exc
    return snap


def _decoder(v: Any) -> dict[str, Any] | None:
    if v is None:
        return None
    if not isinstance(v, dict) or set(v) != {"encoding", "sample_rate", "state", "received"}:
        raise ValueError("decoder must hold encoding, sample_rate, state and received")
    _nat(v["received"])
    return v


def _nat(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_COUNT:
        raise ValueError(f"expected an integer in [0, 2^53), got {str(v)[:24]}")
    return v


# -- sealing: what the state store holds ---------------------------------------------------


def _mac(key: bytes, kid: bytes, context: str, data: bytes) -> bytes:
    m = hmac.new(key, b"snapshot|" + context.encode() + b"|" + kid, hashlib.sha256)
    m.update(data)
    return m.digest()


def seal(data: bytes, key: bytes, kid: str, context: str) -> bytes:
    """``data`` bound to ``context`` (session id and key fingerprint) under ``key`` (id ``kid``)."""
    k = kid.encode("ascii")
    if len(k) != 8:
        raise ValueError("a key id is 8 ASCII characters")
    return _SEAL.pack(SEAL_MAGIC, k, _mac(key, k, context, data)) + data


def unseal(data: bytes, keys: Mapping[str, bytes], context: str) -> bytes:
    """The snapshot inside a sealed value, if sealed for ``context`` by one of ``keys``.

    SnapshotError: ``snapshot_version`` for a format 1 (unsealed) value,
    ``resume_secret_rotated`` when no key of that id is known, ``snapshot_invalid`` for
    anything else (moved to another session, edited, truncated).
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise SnapshotError("snapshot must be bytes")
    data = bytes(data)
    if data[:4] == MAGIC:
        raise SnapshotError(
            f"unsealed snapshot of an older format; this server reads version {FORMAT_VERSION}",
            code="snapshot_version",
        )
    if len(data) < _SEAL.size or data[:4] != SEAL_MAGIC:
        raise SnapshotError("not a sealed Lookback session snapshot")
    _, kid, mac = _SEAL.unpack_from(data)
    key = keys.get(kid.decode("ascii", "replace"))
    if key is None:
        raise SnapshotError(
            "snapshot sealed with a resume secret no replica knows any more", code="resume_secret_rotated"
        )
    body = data[_SEAL.size :]
    if not hmac.compare_digest(_mac(key, kid, context, body), mac):
        raise SnapshotError("snapshot is not this session's: altered or moved in the state store")
    return body


# -- the engine side (taking and restoring: StreamSession.snapshot_value / restore) ----------


def check_compatible(snap: Snapshot, model: ServedModel) -> None:
    """Refuse a snapshot of another graph, or one whose rows the model does not declare."""
    spec = model.spec
    if snap.graph_sha256 != spec.graph.sha256 or snap.model != spec.name:
        raise SnapshotError(
            f"snapshot of {snap.model}/{snap.version} (graph {snap.graph_sha256[:12]}) cannot restore "
            f"into {spec.key} (graph {spec.graph.sha256[:12]})",
            code="resume_incompatible",
        )
    want = {st.input: (tuple(st.shape), model.table.specs[st.input].dtype) for st in spec.states}
    if spec.context_samples:
        want[CONTEXT] = ((spec.context_samples,), np.dtype(np.float32))
    got = {n: (a.shape, a.dtype) for n, a in snap.rows.items()}
    if got != want:
        raise SnapshotError(
            f"snapshot rows {sorted(got)} do not match the model's state {sorted(want)}",
            code="resume_incompatible",
        )
    if snap.frame_samples != spec.frame_samples or snap.encoding not in ENCODINGS:
        raise SnapshotError(
            "snapshot frame size or encoding does not fit the model", code="resume_incompatible"
        )
    bps = 2 if snap.encoding == "pcm_s16le" else 4
    if len(snap.partial) % (spec.frame_samples * bps) or len(snap.partial) >= spec.hop_samples * bps:
        raise SnapshotError("snapshot partial hop is not a whole number of frames below one hop")
    # idle: every sample received (plus end padding) is in a step or in the partial hop
    if snap.frames * spec.frame_samples + snap.padded_samples != (
        snap.steps * spec.hop_samples + len(snap.partial) // bps
    ):
        raise SnapshotError("snapshot step and frame counts do not agree")
    samples = snap.frames * spec.frame_samples + snap.padded_samples  # the model's rate
    if snap.detector[2] > samples or snap.detector[3] > samples:
        raise SnapshotError("snapshot detector points past the stream")
    if any(lab != spec.event_label for _, lab, _ in snap.events):
        raise SnapshotError("snapshot events carry another label than the model's")

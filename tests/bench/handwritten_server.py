"""The hand-written baseline: the streaming server a user writes before they find Lookback.

A FastAPI WebSocket endpoint and ONE ONNX Runtime ``InferenceSession`` shared by every
connection. Each connection keeps its own numpy lookback window and recurrent states and
runs the model inline, batch 1, once per hop, answering each hop with a JSON ``result``
(``send_json``). uvicorn runs with its defaults (only the log level lowered), and ORT with
one thread, as Silero's own Python wrapper sets it. It deliberately imports nothing of
Lookback's engine: "x times hand-written" in the bench report is against this, not against
Lookback's own unbatched mode.

It speaks enough of Lookback's protocol for ``lookback.loadtest`` to measure it unchanged:
a ``ready`` message with the hop, one ``result`` per hop in Lookback's shape, ``end`` gets a
zero-padded last hop, a ``summary`` and a 1000 close; ``/readyz`` reports open sessions.
The model's ``model.json`` gives the input names, shapes and scaling (int16/32768, ``BT``).

    python -m tests.bench.handwritten_server --port 8002 [--model lookback-vad]
"""

from __future__ import annotations

import argparse
import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, WebSocket

STORE = Path(__file__).resolve().parents[2] / "model_store"
DTYPES = {"float32": np.float32, "float64": np.float64, "int64": np.int64, "int32": np.int32}


def model_dir(name: str, store: Path = STORE) -> Path:
    """The newest version folder of ``name`` holding a ``model.json``."""
    found = sorted(p.parent for p in (store / name).glob("*/model.json"))
    if not found:
        raise SystemExit(f"no model.json under {store / name}")
    return found[-1]


def create_app(folder: Path) -> FastAPI:
    spec = json.loads((folder / "model.json").read_text())
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(folder / spec["graph"]["file"]), opts, providers=["CPUExecutionProvider"])
    rate, hop, ctx = spec["sample_rate"], spec["hop_samples"], spec["context_samples"]
    audio_name = spec["audio_input"]["name"]
    b1t = spec["audio_input"].get("layout", "BT") == "B1T"
    states = spec.get("states", [])
    constants = {
        c["name"]: np.array(c["value"], dtype=DTYPES[c["dtype"]]).reshape(c.get("shape", []))
        for c in spec.get("constants", [])
    }
    outputs = [(o["name"], o["labels"]) for o in spec["outputs"]]
    out_names = [o.name for o in sess.get_outputs()]
    labels = [label for _, ls in outputs for label in ls]
    app = FastAPI(title="hand-written naive server")
    open_sessions = [0]

    @app.get("/readyz")
    async def readyz() -> dict[str, Any]:
        return {"ready": True, "sessions": open_sessions[0]}

    @app.websocket("/v1/stream")
    async def stream(ws: WebSocket) -> None:
        await ws.accept()
        open_sessions[0] += 1
        window = np.zeros(ctx + hop, np.float32)
        state: dict[str, np.ndarray] = {}
        for st in states:
            shape = list(st["shape"])
            shape.insert(st["batch_axis"], 1)
            state[st["input"]] = np.full(shape, st["initial"], DTYPES[st["dtype"]])
        buf = bytearray()
        step = frames = padded = 0

        async def run_hop(pcm: bytes) -> None:
            nonlocal step
            window[:ctx] = window[hop:]
            window[ctx:] = np.frombuffer(pcm, np.int16) / np.float32(32768)
            feeds = {**constants, **state, audio_name: window[None, None, :] if b1t else window[None, :]}
            outs = dict(zip(out_names, sess.run(None, feeds), strict=True))
            for st in states:
                state[st["input"]] = outs[st["output"]]
            values = [float(v) for name, _ in outputs for v in np.asarray(outs[name]).ravel()]
            await ws.send_json(
                {
                    "type": "result",
                    "step": step,
                    "time": (step + 1) * hop / rate,
                    "scores": dict(zip(labels, values, strict=True)),
                }
            )
            step += 1

        try:
            await ws.send_json(
                {
                    "type": "ready",
                    "session_id": uuid.uuid4().hex[:16],
                    "model": spec["name"],
                    "version": spec["version"],
                    "sample_rate": rate,
                    "frame_samples": spec["frame_samples"],
                    "hop_samples": hop,
                    "labels": labels,
                    "encoding": "pcm_s16le",
                    "threshold": spec.get("events", {}).get("threshold", 0.5),
                }
            )
            while True:
                msg = await ws.receive()
                if msg["type"] == "websocket.disconnect":
                    return
                if msg.get("bytes") is not None:
                    buf += msg["bytes"]
                    frames += len(msg["bytes"]) // (spec["frame_samples"] * 2)
                    while len(buf) >= hop * 2:
                        await run_hop(bytes(buf[: hop * 2]))
                        del buf[: hop * 2]
                    continue
                if json.loads(msg.get("text") or "{}").get("type") == "end":
                    if buf:
                        padded = hop - len(buf) // 2
                        await run_hop(bytes(buf) + bytes(padded * 2))
                    await ws.send_json(
                        {
                            "type": "summary",
                            "frames": frames,
                            "steps": step,
                            "failed_steps": 0,
                            "padded_samples": padded,
                            "duration": frames * spec["frame_samples"] / rate,
                            "events": [],
                        }
                    )
                    await ws.close(1000, "normal")
                    return
        finally:
            open_sessions[0] -= 1

    return app


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8002)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--model", default="lookback-vad")
    a = ap.parse_args()
    uvicorn.run(create_app(model_dir(a.model)), host=a.host, port=a.port, log_level="warning")

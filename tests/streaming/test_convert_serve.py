"""A converted stock PyTorch model served by a real server: the scores over the WebSocket (one
and several frames per message) and over REST are the module's own batch forward."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf
import torch

from lookback.streaming import export
from lookback.streaming.convert import convert
from tests.api.ws_util import END, frames, run_session
from tests.conftest import running_server
from tests.conftest import test_settings as make_settings
from tests.streaming.stock_models import CRNN, randomise
from tests.support import read_clip

TOL = 1e-5


async def test_a_converted_crnn_serves_its_pytorch_scores(tmp_path: Path) -> None:
    model = convert(randomise(CRNN(), seed=4), labels=["speech", "music"])
    store = tmp_path / "store"
    assert export(model, store / "crnn" / "1", name="crnn").ok
    hops = 16000 * 3 // model.hop_samples
    clip = read_clip("lookback_speech_noise.wav")[: hops * model.hop_samples]  # whole hops
    audio = np.concatenate([np.zeros(model.context_samples), clip / 32768.0])
    with torch.no_grad():
        ref = model.reference(torch.from_numpy(audio.astype(np.float32))[None])[0].numpy()  # [N, 2]
    assert ref.shape == (hops, 2) and float(ref.std()) > 1e-3  # not a constant output

    settings = make_settings(model_store=store, default_model="crnn")
    with running_server(settings) as srv:
        for per_message in (1, 10):
            s = await run_session(srv.ws, [*frames(clip, per_message), END], model="crnn")
            assert not s.errors, s.errors
            for i, label in enumerate(("speech", "music")):
                got = np.asarray(s.scores(label))
                assert got.size == hops, (got.size, hops)
                np.testing.assert_allclose(got, ref[:, i], rtol=0, atol=TOL)
        buf = io.BytesIO()
        sf.write(buf, clip, 16000, format="WAV", subtype="PCM_16")
        async with httpx.AsyncClient(timeout=60) as http:
            r = await http.post(
                f"{srv.url}/v1/score",
                params={"model": "crnn"},
                content=buf.getvalue(),
                headers={"content-type": "audio/wav"},
            )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["labels"] == ["speech", "music"]
        for i, label in enumerate(body["labels"]):
            np.testing.assert_allclose(body["scores"][label], ref[:, i], rtol=0, atol=TOL)

"""G.711 decode tables (and the producers' encoder) against independent references: the
standard library's ``audioop`` (Python 3.11/3.12; deprecated, removed in 3.13) and the ITU-T
G.711 tables' defining points."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from lookback.engine.pcm import BYTES_PER_SAMPLE, G711, decode, encode_g711, silence

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import audioop
    except ImportError:  # Python 3.13+: the spot checks below still run
        audioop = None  # type: ignore[assignment]

CODES = bytes(range(256))


@pytest.mark.skipif(audioop is None, reason="audioop is gone from this Python (3.13+)")
def test_mulaw_table_equals_audioop() -> None:
    ref = np.frombuffer(audioop.ulaw2lin(CODES, 2), "<i2")
    assert np.array_equal(G711["mulaw"], ref)


@pytest.mark.skipif(audioop is None, reason="audioop is gone from this Python (3.13+)")
def test_alaw_table_equals_audioop() -> None:
    ref = np.frombuffer(audioop.alaw2lin(CODES, 2), "<i2")
    assert np.array_equal(G711["alaw"], ref)


def test_g711_defining_points() -> None:
    """Values from ITU-T G.711's tables, in the 16-bit scale codecs use: µ-law 0xFF and 0x7F
    are +0 and -0, 0x80/0x00 the extremes ±8031 (14-bit units) x 4; A-law 0xD5/0x55 the
    smallest magnitude ±1 (13-bit units, mid-step) x 8, 0xAA/0x2A the extremes ±4032 x 8."""
    mu, a = G711["mulaw"], G711["alaw"]
    assert mu[0xFF] == 0 and mu[0x7F] == 0
    assert mu[0x80] == 32124 and mu[0x00] == -32124
    assert a[0xD5] == 8 and a[0x55] == -8
    assert a[0xAA] == 32256 and a[0x2A] == -32256
    # monotone within each sign: codes order the magnitudes
    assert np.all(np.diff(mu[0x80:0x100].astype(int)) < 0)
    assert np.all(np.diff(mu[0x00:0x80].astype(int)) > 0)


def test_decode_is_the_table_over_32768_and_silence_is_near_zero() -> None:
    for enc in ("mulaw", "alaw"):
        assert BYTES_PER_SAMPLE[enc] == 1
        x = decode(CODES, enc)
        assert x.dtype == np.float32
        assert np.array_equal(x, G711[enc].astype(np.float32) / np.float32(32768))
        assert np.abs(decode(silence(enc, 10), enc)).max() <= 8 / 32768


ALL_INT16 = np.arange(-32768, 32768, dtype=np.int16)


@pytest.mark.skipif(audioop is None, reason="audioop is gone from this Python (3.13+)")
@pytest.mark.parametrize("encoding", ["mulaw", "alaw"])
def test_encoder_equals_audioop_for_every_int16(encoding: str) -> None:
    """The encoder the client and the load generator use: every 16-bit value, clipping included."""
    lin2 = audioop.lin2ulaw if encoding == "mulaw" else audioop.lin2alaw
    assert encode_g711(ALL_INT16, encoding) == lin2(ALL_INT16.tobytes(), 2)


@pytest.mark.parametrize("encoding", ["mulaw", "alaw"])
def test_encoding_a_decoded_code_gives_the_code_back(encoding: str) -> None:
    """Each code's own value encodes to it (µ-law's -0, 0x7F, encodes as +0, 0xFF)."""
    back = np.frombuffer(encode_g711(G711[encoding], encoding), np.uint8)
    codes = np.arange(256)
    if encoding == "mulaw":
        codes[0x7F] = 0xFF
    assert np.array_equal(back, codes)

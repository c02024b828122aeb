"""The streaming resampler: exact under any cutting, a state that round-trips, a clean filter."""

from __future__ import annotations

import numpy as np
import pytest

from lookback.engine.resample import Resampler
from tests.engine.rate_support import RATES

OTHER = [r for r in RATES if r != 16000]


def run(rate: int, x: np.ndarray, sizes: list[int]) -> np.ndarray:
    r = Resampler(rate, 16000)
    out, pos, i = [], 0, 0
    while pos < x.size:
        k = sizes[i % len(sizes)]
        out.append(r.feed(x[pos : pos + k]))
        pos += k
        i += 1
    out.append(r.flush())
    return np.concatenate(out)


@pytest.mark.parametrize("rate", OTHER)
def test_output_is_the_same_bits_however_the_input_is_cut(rate: int) -> None:
    rng = np.random.default_rng(rate)
    x = (rng.standard_normal(rate // 2) * 0.3).astype(np.float32)
    ref = run(rate, x, [x.size])
    assert ref.size == -(-x.size * 16000 // rate)  # one output per output instant of the input
    for sizes in ([1], [7], [160], [441], list(rng.integers(1, 999, 40))):
        assert np.array_equal(run(rate, x, [int(s) for s in sizes]).view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("rate", OTHER)
def test_state_round_trips_mid_stream(rate: int) -> None:
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(rate // 4) * 0.3).astype(np.float32)
    ref = run(rate, x, [x.size])
    a = Resampler(rate, 16000)
    first = a.feed(x[:1234])
    b = Resampler(rate, 16000)
    b.set_state(a.get_state())
    rest = np.concatenate([b.feed(x[1234:]), b.flush()])
    assert np.array_equal(np.concatenate([first, rest]), ref)


def test_a_state_of_another_conversion_or_damaged_is_refused() -> None:
    a = Resampler(8000, 16000)
    a.feed(np.zeros(100, np.float32))
    blob = a.get_state()
    with pytest.raises(ValueError):
        Resampler(48000, 16000).set_state(blob)
    with pytest.raises(ValueError):
        Resampler(8000, 16000).set_state(blob[:-4])
    with pytest.raises(ValueError):
        Resampler(8000, 16000).set_state(blob[:10])


@pytest.mark.parametrize("rate", OTHER)
def test_a_tone_in_the_passband_comes_out_as_the_tone(rate: int) -> None:
    f = 1000.0
    x = (0.5 * np.sin(2 * np.pi * f * np.arange(rate) / rate)).astype(np.float32)
    y = run(rate, x, [160])
    t = np.arange(y.size) / 16000
    err = np.abs(y - 0.5 * np.sin(2 * np.pi * f * t))[400:-400]  # away from the edges
    assert err.max() < 1e-3  # aligned in time (no delay) and within the passband ripple


@pytest.mark.parametrize("rate", [32000, 44100, 48000])
def test_tones_above_the_output_nyquist_do_not_alias(rate: int) -> None:
    f = 9000.0  # above 8 kHz: would fold back to 7 kHz without the filter
    x = (0.5 * np.sin(2 * np.pi * f * np.arange(rate) / rate)).astype(np.float32)
    y = run(rate, x, [rate])[2000:-2000]
    assert np.sqrt(np.mean(y.astype(np.float64) ** 2)) < 0.5 * 10 ** (-70 / 20)  # >= 70 dB down

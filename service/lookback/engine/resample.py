"""A streaming rational resampler whose state is a value and whose output ignores chunking.

Producers send 8 kHz telephony or 44.1/48 kHz browser audio; models want their own rate.
The resampler must be part of a session's snapshot (a resume continues bit for bit) and
give the same samples however the audio was cut into messages. C resamplers (libsoxr's
stream API) keep their state opaque and filter in blocks, so neither holds; this one is
a polyphase FIR in numpy: upsample by ``L``, low-pass, downsample by ``M`` (``L/M`` the
reduced ratio of the rates), computed only at the output instants.

Output ``k`` sits at input time ``k*M/L`` (no delay: times keep meaning the same) and is
one dot product of the ``2H+1`` input samples around it with the filter phase
``k*M mod L``, the same product whatever arrived before or after it; it is emitted as
soon as its last input sample has arrived (a look-ahead of ``H`` input samples).
The state is the input samples still needed, the count of inputs received and the next
output index. ``flush`` emits the outputs up to the last input instant with zeros as
look-ahead (the end of a stream), without adding the zeros to the history.

Filter: Kaiser-windowed sinc, 32 zero crossings of the lower rate each side, about
80 dB stopband from the lower Nyquist on, passband to 0.84 of it (3.4 kHz for 8 kHz
audio). Quality and cost against libsoxr: tests/bench/resample_bench.py.
"""

from __future__ import annotations

import math
import struct

import numpy as np

ZEROS = 32  # zero crossings of the lower rate on each side of the sinc
STOPBAND_DB = 80.0
_STATE = struct.Struct("<4sIIqqI")  # magic, rate in, rate out, inputs received, next output, history


def design(rate_in: int, rate_out: int, zeros: int = ZEROS, stopband_db: float = STOPBAND_DB) -> tuple:
    """(L, M, H, bank): ``bank[p, i]`` weighs input ``n0 - H + i`` for an output of phase ``p``."""
    g = math.gcd(rate_in, rate_out)
    up, down = rate_out // g, rate_in // g
    width = zeros * max(up, down)  # half length in samples of the upsampled rate
    half = -(-width // up)  # input samples each side
    # Kaiser: transition (in units of the lower Nyquist) for this length and attenuation;
    # the stopband starts at the lower Nyquist, so nothing above it aliases back.
    beta = 0.1102 * (stopband_db - 8.7)
    transition = (stopband_db - 7.95) / (2.285 * 2 * zeros * math.pi)
    cutoff = (1.0 - transition / 2) / max(up, down)  # of the upsampled Nyquist
    phases = np.arange(up, dtype=np.float64)[:, None]
    taps = np.arange(2 * half + 1, dtype=np.float64)[None, :]
    d = phases - (taps - half) * up  # distance output - input, in upsampled samples
    inside = np.abs(d) <= width
    window = np.i0(beta * np.sqrt(np.clip(1.0 - (d / width) ** 2, 0.0, 1.0))) / np.i0(beta)
    bank = np.where(inside, up * cutoff * np.sinc(cutoff * d) * window, 0.0)
    return up, down, half, np.ascontiguousarray(bank)


_BANKS: dict[tuple[int, int], tuple] = {}


class Resampler:
    """``rate_in`` -> ``rate_out``, float32 in and out, stateful and chunking-invariant."""

    def __init__(self, rate_in: int, rate_out: int) -> None:
        key = (rate_in, rate_out)
        if key not in _BANKS:
            _BANKS[key] = design(rate_in, rate_out)
        self.rate_in, self.rate_out = rate_in, rate_out
        self.up, self.down, self.half, bank = _BANKS[key]
        self._bank = bank.astype(np.float32)  # float32 products: half the memory traffic
        self._width = 2 * self.half + 1
        self.received = 0  # input samples fed so far
        self.next = 0  # index of the next output sample
        self._hist = np.zeros(self.half, np.float32)  # inputs from received - len(_hist) on

    def available(self, n: int) -> int:
        """Outputs that feeding ``n`` more input samples would emit."""
        end = -(-((self.received + n - self.half) * self.up) // self.down)
        return max(0, end - self.next)

    def feed(self, x: np.ndarray) -> np.ndarray:
        """Feed float32 samples; the outputs whose inputs are all here now."""
        self._hist = np.concatenate([self._hist, x.astype(np.float32, copy=False)])  # contiguous
        self.received += x.size
        return self._emit(self.next + self.available(0), self._hist)

    def flush(self) -> np.ndarray:
        """Every output up to the last input instant, zeros standing in for the look-ahead."""
        end = -(-(self.received * self.up) // self.down)
        padded = np.concatenate([self._hist, np.zeros(self.half, np.float32)])
        return self._emit(end, padded)

    def _emit(self, end: int, hist: np.ndarray) -> np.ndarray:
        first, count = self.next, max(0, end - self.next)
        base = self.received - self._hist.size  # input index of hist[0]
        out = np.empty(count, np.float32)
        if count:
            up, down, width = self.up, self.down, self._width
            # Each output is its window times its phase's taps, summed along the row by
            # einsum's own loop (not BLAS, whose kernels treat a row by its place in a
            # block): the same operations whatever else is computed with it, so chunking
            # never changes a bit. Few phases (8, 24, 32, 48 kHz): the outputs of one phase
            # are windows a fixed stride apart, a view; many (22.05, 44.1 kHz): gathered.
            if up <= 4:
                for j in range(min(up, count)):
                    pos = (first + j) * down
                    n = len(range(j, count, up))
                    start = pos // up - self.half - base
                    rows = np.ndarray((n, width), np.float32, hist, start * 4, (down * 4, 4))
                    out[j::up] = np.einsum("ij,j->i", rows, self._bank[pos % up])
            else:
                pos = np.arange(first, end, dtype=np.int64) * down
                windows = np.lib.stride_tricks.sliding_window_view(hist, width)
                out[:] = np.einsum("ij,ij->i", windows[pos // up - self.half - base], self._bank[pos % up])
            self.next = end
        keep = (self.next * self.down) // self.up - self.half - base  # first input still needed
        if keep > 0:
            self._hist = self._hist[min(keep, self._hist.size) :].copy()
        return out

    # -- state (part of a session snapshot) -------------------------------------------------
    def get_state(self) -> bytes:
        hist = np.ascontiguousarray(self._hist, "<f4")
        head = _STATE.pack(b"LBRS", self.rate_in, self.rate_out, self.received, self.next, hist.size)
        return head + hist.tobytes()

    def set_state(self, data: bytes) -> None:
        """Continue from ``get_state``'s bytes; ValueError when they do not fit this resampler."""
        if len(data) < _STATE.size:
            raise ValueError("resampler state truncated")
        magic, rin, rout, received, nxt, n = _STATE.unpack_from(data)
        if magic != b"LBRS" or (rin, rout) != (self.rate_in, self.rate_out):
            raise ValueError("resampler state of another conversion")
        if len(data) != _STATE.size + 4 * n or received < 0 or nxt < 0:
            raise ValueError("resampler state has an inconsistent size")
        hist = np.frombuffer(data, "<f4", count=n, offset=_STATE.size).astype(np.float32)
        base = received - n
        first = (nxt * self.down) // self.up - self.half
        if first < base or n > 4 * self._width + 8 or not np.isfinite(hist).all():
            raise ValueError("resampler state does not hold the inputs its next output needs")
        self.received, self.next, self._hist = received, nxt, hist

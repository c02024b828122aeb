"""``lookback loadtest``: how many real-time streams does this server hold at a latency bound?

N concurrent WebSocket sessions each stream a WAV file (looped) at real-time pace: ``k``
frames of 128 samples per message, one message every ``k * 8`` ms, each session with a
random phase. For every result the client measures the time from sending the frame that
completed the step (step ``i`` completes at frame ``(i + 1) * hop / 128 - 1``) to
receiving the result, and reports p50/p90/p99/p99.9, results/s, frames late (above the
bound), results lost (none by the end: each session sends ``end`` and compares the
summary's step count), errors and close codes. ``--ramp`` searches the largest N whose p99
stays under the bound with nothing lost.

``--encoding`` (``pcm_f32le``, G.711 ``mulaw``/``alaw``) and ``--sample-rate`` (8 to 48 kHz)
load the server's decoder and resampler: messages are then ``--message-ms`` (20) of audio at
that rate, and a step is timed from the message that completed it after the resampler's
look-ahead (``rawclient.WireTiming``).

The client must never be the bottleneck, so it is cheap and spread over processes:

- a minimal asyncio WebSocket client (``RawSession``): the HTTP upgrade is written by
  hand without extensions (no permessage-deflate); every audio message is pre-built once,
  header and masked payload, and shared by all sessions of a process, so sending one is a
  single ``transport.write``; server frames are parsed minimally (unmasked, 7/16/64-bit
  lengths) and results by a fixed-prefix fast path (orjson otherwise);
- one scheduler per process wakes once per 1 ms phase slot and sends for every session in
  it, instead of a timer per session;
- sessions are spread over ``--procs`` processes (default: <= 150 sessions each); each
  reports its CPU use and how late its sends ran against their schedule, and the report
  says so when the client itself was the limit.

``--client websockets`` runs the same schedule over the ``websockets`` library instead
(a cross-check of the raw client; it costs about twice as much per message).

Loopback only unless ``--allow-remote``; every phase is bounded in time.

The modules, in dependency order (none imports this package's ``__init__``):

- ``config``: ``LoadConfig``, limits, URL checks;
- ``rawclient``: WebSocket framing and the minimal client (``RawSession``) and what the
  sessions of one process share (``Proc``); ``libclient``: the same over ``websockets``;
- ``audio``: the clip and the pre-built messages;
- ``fanout``: one process's schedule and the spread of sessions over processes (``run_load``);
- ``report``: merging the processes' counts, text reports; ``ramp``: the search for N;
- ``idle``: idle sessions for memory-per-session runs; ``cli``: ``lookback loadtest``.
"""

// Lookback browser demo: microphone or WAV file -> AudioWorklet (float32 at the audio
// device's own rate, which the server resamples; or, where that rate is not one the server
// takes, 128-sample pcm_s16le frames the browser resampled) -> WebSocket /v1/stream ->
// scores, events and round-trip latency.
// No build step and no third-party code: everything here is served by Lookback.
"use strict";

(() => {
  const WINDOW_S = 10; // seconds shown on the plot
  const LAT_WINDOW = 200; // latencies used for p50 / p95
  const COLORS = ["#4fb3ff", "#f778ba", "#3fb950", "#d29922", "#a371f7", "#ff7b72"];

  // Human text for the server's error codes (service/protocol.py ERRORS).
  const ERROR_TEXT = {
    bad_frame_size: "A binary message was not a whole number of 128-sample frames; it was dropped.",
    empty_message: "An empty binary message was ignored.",
    message_too_large: "A binary message was too large and was dropped.",
    too_many_frames: "A message carried too many frames and was dropped.",
    non_finite_audio: "Audio with NaN or Inf values was dropped.",
    too_many_pending_steps: "Audio arrives faster than the server scores it; some audio was dropped.",
    bad_json: "The server could not parse a control message (bad JSON).",
    missing_type: "A control message had no type.",
    unknown_type: "The server does not know that control message.",
    audio_after_end: "Audio arrived after the end of the stream and was ignored.",
    inference_failed: "The model failed on one step; that step has no score.",
    bad_encoding: "The server does not accept this audio encoding.",
    bad_sample_rate: "The server does not accept this audio sample rate.",
    bad_query: "The server refused the connection parameters.",
    unknown_model: "That model is not loaded on the server.",
    unknown_version: "That model version is not loaded on the server.",
    unauthorized: "The API key is missing or wrong.",
    origin_not_allowed: "This page's origin is not allowed to stream to the server.",
    server_busy: "The server is at capacity; try again in a moment.",
    draining: "The server is shutting down; connect again later.",
    idle_timeout: "The session was closed because no audio arrived for too long.",
    max_duration: "The session reached the server's maximum duration.",
    slow_consumer: "The session was closed because results were not read fast enough.",
    internal_error: "The server hit an unexpected error.",
  };

  // Human text for WebSocket close codes (service/protocol.py Close).
  const CLOSE_TEXT = {
    1000: "Session ended normally.",
    1001: "The server is shutting down (draining); buffered audio was scored.",
    1005: "The connection closed without a status code.",
    // A refused handshake (401/403/503) reaches a page only as 1006. The pre-check of
    // /v1/models has just passed, so the API key is fine: busy, draining or origin.
    1006: "server busy or refused (1006): the server is at capacity or draining, or does not " +
          "allow this page's origin. Try again in a moment.",
    1009: "A message exceeded the server's transport limit (1009).",
    1011: "The server hit an unexpected error (1011).",
    1013: "The server is at capacity (1013); try again in a moment.",
    4400: "The server refused the connection parameters (4400).",
    4404: "The model or version is not loaded on the server (4404).",
    4408: "Closed after no audio for too long (4408).",
    4409: "The session reached the server's maximum duration (4409).",
    4429: "Closed because results were not read fast enough (4429).",
    4100: "The server moved this session (4100); resuming…",
  };
  // Closes after which the session is resumed with its token (docs/sessions.md).
  const RESUMABLE = new Set([1006, 1011, 1012, 4100]);
  const REPLAY_LIMIT_S = 60; // audio kept for a replay, at most
  // Rates the server resamples from (README: sample_rate); the page sends its audio
  // device's rate when it is one of these, and `?resample=browser` forces the fallback.
  const SERVER_RATES = [8000, 16000, 22050, 24000, 32000, 44100, 48000];
  const NATIVE_QUANTA = 3; // render quanta a message at the native rate: 8 ms at 48 kHz

  function gcd(a, b) { return b ? gcd(b, a % b) : a; }

  // The server's resampler (engine/resample.py) as far as timing goes: output k (model
  // rate) sits at input k * down / up and needs `half` inputs of look-ahead (32 zero
  // crossings of the lower rate each side).
  function resampling(rateIn, rateOut) {
    if (rateIn === rateOut) return { up: 1, down: 1, half: 0 };
    const g = gcd(rateIn, rateOut);
    const up = rateOut / g, down = rateIn / g;
    return { up, down, half: Math.ceil(32 * Math.max(up, down) / up) };
  }

  const $ = (id) => document.getElementById(id);
  const ui = {
    model: $("model"), token: $("token"), start: $("start"), stop: $("stop"), file: $("file"),
    drop: $("drop"), state: $("state"), message: $("message"), plot: $("plot"),
    session: $("session"), results: $("results"), stime: $("stime"), latency: $("latency"),
    score: $("score"), level: $("level"), events: $("events"), log: $("log"),
  };

  // What the page showed, for tests and for curious people at the console.
  const demo = {
    state: "idle", message: "", models: null, ready: null, summary: null, source: null,
    results: 0, framesSent: 0, lastScores: null, events: [], latencies: [], errors: [],
    closes: [], log: [], resumes: 0, gapFree: true, framesTaken: 0, samplesTaken: 0,
    wire: null, p50: null, p95: null,
  };
  window.lookbackDemo = demo;

  // -------------------------------------------------------------------------- status / log
  function setState(state, message, isError) {
    demo.state = state;
    demo.message = message || "";
    ui.state.textContent = state;
    ui.state.className = "badge " + state;
    ui.message.textContent = message || "";
    ui.message.className = isError ? "error" : "";
    const busy = ["checking", "connecting", "streaming", "ending"].includes(state);
    ui.start.disabled = busy || !ui.model.value;
    ui.stop.disabled = !(state === "connecting" || state === "streaming");
    ui.model.disabled = busy;
    ui.token.disabled = busy;
    ui.file.disabled = busy || !ui.model.value;
    ui.drop.classList.toggle("disabled", busy);
  }

  function log(text, level) {
    demo.log.push(text);
    const li = document.createElement("li");
    li.textContent = new Date().toLocaleTimeString() + "  " + text;
    if (level) li.className = level;
    ui.log.prepend(li);
    while (ui.log.childElementCount > 200) ui.log.lastElementChild.remove();
  }

  function fail(message, code) {
    demo.errors.push({ code: code || "client", message });
    log(message, "error");
    setState("error", message, true);
  }

  window.addEventListener("error", (e) => fail("page error: " + e.message));
  window.addEventListener("unhandledrejection", (e) =>
    fail("page error: " + (e.reason && e.reason.message ? e.reason.message : String(e.reason))));

  // -------------------------------------------------------------------------- models
  function token() {
    return ui.token.value.trim();
  }

  // GET /v1/models: fills the picker, and doubles as the pre-check before connecting,
  // since a refused WebSocket handshake reaches the page only as close 1006.
  async function fetchModels() {
    const headers = token() ? { Authorization: "Bearer " + token() } : {};
    let r;
    try {
      r = await fetch("/v1/models", { headers, cache: "no-store" });
    } catch (e) {
      return { ok: false, message: "Cannot reach the Lookback server: " + e.message };
    }
    if (r.status === 401) {
      return {
        ok: false, code: "unauthorized",
        message: token() ? "The API key was rejected (401 unauthorized): check it and try again."
          : "This server needs an API key (401 unauthorized): enter it in the API key field.",
      };
    }
    if (!r.ok) {
      let detail = "";
      try {
        const body = await r.json();
        if (body && body.error) detail = ": " + (ERROR_TEXT[body.error.code] || body.error.message);
      } catch (_) { /* not JSON */ }
      return { ok: false, code: "http_" + r.status, message: `The server answered ${r.status}${detail}` };
    }
    return { ok: true, body: await r.json() };
  }

  function labelsOf(m) {
    if (Array.isArray(m.labels)) return m.labels;
    return (m.outputs || []).flatMap((o) => o.labels || []);
  }

  function selectedModel() {
    const models = (demo.models && demo.models.models) || [];
    return models.find((m) => (m.key || `${m.name}/${m.version}`) === ui.model.value) || null;
  }

  async function loadModels() {
    setState("checking", "Loading models…");
    const res = await fetchModels();
    if (!res.ok) {
      ui.model.innerHTML = '<option value="">(no models)</option>';
      fail(res.message, res.code);
      return false;
    }
    demo.models = res.body;
    const keep = ui.model.value;
    ui.model.innerHTML = "";
    const models = res.body.models || [];
    for (const m of models) {
      const key = m.key || `${m.name}/${m.version}`;
      const opt = document.createElement("option");
      opt.value = key;
      const hop = m.hop_samples / m.sample_rate * 1000;
      opt.textContent = `${key}  (${labelsOf(m).join(", ")}; ${hop.toFixed(0)} ms hop)`;
      ui.model.append(opt);
    }
    const preferred = models.find((m) => (m.key || "") === keep) ||
      models.find((m) => m.name === res.body.default_model && m.latest !== false) ||
      models.find((m) => m.name === res.body.default_model) || models[0];
    if (preferred) ui.model.value = preferred.key || `${preferred.name}/${preferred.version}`;
    if (!models.length) {
      fail("The server has no models loaded.");
      return false;
    }
    setState("idle", `Ready: ${models.length} model(s) on ${res.body.provider || "the server"}. ` +
      "Press Start microphone, or drop a WAV file.");
    return true;
  }

  ui.token.addEventListener("change", () => { if (!sess) loadModels(); });
  ui.model.addEventListener("change", () => { if (!sess) setState(demo.state, demo.message); });

  // -------------------------------------------------------------------------- plot state
  let points = []; // {t, s: number[]}
  let regions = []; // {label, start, end|null}
  let labels = ["speech"];
  let threshold = 0.5;
  let tNow = 0;
  let dirty = true;

  function resetView() {
    points = [];
    regions = [];
    tNow = 0;
    demo.results = 0;
    demo.framesSent = 0;
    demo.events = [];
    demo.latencies = [];
    demo.lastScores = null;
    demo.summary = null;
    demo.ready = null;
    demo.p50 = demo.p95 = null;
    ui.events.innerHTML = "";
    ui.results.textContent = "0";
    ui.stime.textContent = "0.0 s";
    ui.latency.textContent = "—";
    ui.score.textContent = "—";
    ui.session.textContent = "—";
    dirty = true;
  }

  // -------------------------------------------------------------------------- session
  // One streaming session: an AudioContext (the device's rate, or the model's), the
  // worklet, a source (microphone or file) and the WebSocket.
  let sess = null;

  class Session {
    constructor(model, kind) {
      this.model = model;
      this.kind = kind; // "microphone" | "file"
      this.modelRate = model.sample_rate || 16000;
      this.hop = model.hop_samples || 128;
      this.frame = model.frame_samples || 128;
      // Created synchronously inside the click handler: counts as a user gesture. The
      // device's own rate goes to the server as float32 (its resampler is inside the
      // parity guarantee); a rate it does not take falls back to a context at the
      // model's rate, which the browser resamples into.
      const forced = new URLSearchParams(location.search).get("resample") === "browser";
      let ctx = forced ? null : new AudioContext({ latencyHint: "interactive" });
      if (ctx && !SERVER_RATES.includes(ctx.sampleRate)) {
        ctx.close().catch(() => {});
        ctx = null;
      }
      this.ctx = ctx || new AudioContext({ sampleRate: this.modelRate, latencyHint: "interactive" });
      this.rate = this.ctx.sampleRate;
      const native = ctx !== null && this.rate !== this.modelRate;
      this.encoding = native ? "pcm_f32le" : "pcm_s16le";
      this.bps = native ? 4 : 2; // bytes a sample
      this.quanta = native ? NATIVE_QUANTA : 1;
      this.rs = resampling(this.rate, this.modelRate);
      demo.wire = {
        encoding: this.encoding, sampleRate: this.rate,
        resampledBy: native ? "server" : ctx ? "none" : "browser",
      };
      this.ws = null;
      this.node = null;
      this.source = null;
      this.stream = null;
      this.opened = false;
      this.readyMsg = null;
      this.ending = false;
      this.closed = false;
      this.lastError = null;
      this.sendTimes = new Map(); // step index -> performance.now() of the completing frame
      this.framesSent = 0;
      this.samplesSent = 0;
      this.level = 0;
      // resume: the token, audio not yet durable (checkpoint), dedup of re-sent results
      this.resumeToken = null;
      this.replay = []; // {start, pcm}: frames after the last checkpoint
      this.pos = 0; // samples taken from the worklet (at this.rate)
      this.nextStep = 0;
      this.eventsSeen = 0;
      this.skipEvents = 0;
      this.resuming = false;
      this.attempts = 0;
    }

    // Model-rate samples the server has released after `n` samples at this.rate (the
    // resampler's look-ahead held back), and after the end (flush: none held back).
    modelSamples(n, ended) {
      const { up, down, half } = this.rs;
      const m = ended ? n : n - half;
      return m <= 0 ? 0 : Math.ceil(m * up / down);
    }

    async setupAudio() {
      if (!SERVER_RATES.includes(this.rate)) {
        throw new Error(`this browser could not open audio at ${this.modelRate} Hz ` +
          `(got ${this.ctx.sampleRate} Hz, a rate the server does not take); try a Chromium-based browser`);
      }
      await this.ctx.audioWorklet.addModule("worklet.js");
      this.node = new AudioWorkletNode(this.ctx, "lookback-pcm-framer", {
        numberOfInputs: 1, numberOfOutputs: 1, outputChannelCount: [1],
        channelCount: 1, channelCountMode: "explicit", channelInterpretation: "speakers",
        processorOptions: { encoding: this.encoding, quanta: this.quanta },
      });
      this.node.port.onmessage = (e) => this.onFrame(e.data);
      this.node.connect(this.ctx.destination); // silent output; keeps the node pulled
      if (this.ctx.state !== "running") await this.ctx.resume();
    }

    connect() {
      const m = this.model;
      const q = new URLSearchParams({
        model: m.name, version: m.version, encoding: this.encoding,
        sample_rate: String(this.rate), results: "all",
      });
      q.set("resumable", "1");
      if (this.resuming) {
        q.set("resume", this.resumeToken);
        q.set("next_step", String(this.nextStep));
        q.set("sent", String(this.pos));
      }
      if (token()) q.set("token", token());
      const proto = location.protocol === "https:" ? "wss:" : "ws:";
      const ws = new WebSocket(`${proto}//${location.host}/v1/stream?${q}`);
      ws.binaryType = "arraybuffer";
      this.ws = ws;
      return new Promise((resolve, reject) => {
        this.onReady = resolve;
        this.onRefused = reject;
        ws.onopen = () => { this.opened = true; };
        ws.onmessage = (e) => this.onMessage(e);
        ws.onclose = (e) => this.onClose(e);
        ws.onerror = () => { /* the close event follows with the code */ };
      });
    }

    onFrame(msg) {
      if (msg.type === "drained") {
        if (this.onDrained) this.onDrained();
        return;
      }
      if (msg.type !== "frame") return;
      this.level = Math.max(msg.peak, this.level * 0.9);
      const ws = this.ws;
      if (!this.readyMsg || this.ending) return;
      this.replay.push({ start: this.pos, pcm: msg.pcm });
      this.pos += msg.pcm.byteLength / this.bps;
      demo.samplesTaken = this.pos;
      // model-rate frames the session will have been fed once the stream ends
      demo.framesTaken = Math.ceil(this.modelSamples(this.pos, true) / this.frame);
      while (this.replay.length && this.replay[0].start < this.pos - REPLAY_LIMIT_S * this.rate) {
        this.replay.shift();
      }
      if (this.resuming || !ws || ws.readyState !== WebSocket.OPEN) return; // kept for the replay
      const now = performance.now();
      ws.send(msg.pcm);
      this.framesSent += 1;
      demo.framesSent = this.framesSent;
      // The message that completes a hop (in model-rate samples, after the server's
      // resampler) completes model step floor(samples / hop) - 1.
      const before = Math.floor(this.modelSamples(this.samplesSent, false) / this.hop);
      this.samplesSent += msg.pcm.byteLength / this.bps;
      const after = Math.floor(this.modelSamples(this.samplesSent, false) / this.hop);
      for (let step = before; step < after; step++) this.sendTimes.set(step, now);
    }

    onMessage(e) {
      if (typeof e.data !== "string") return;
      let msg;
      try {
        msg = JSON.parse(e.data);
      } catch (_) {
        fail("The server sent a message that is not JSON.");
        return;
      }
      switch (msg.type) {
        case "ready": return this.handleReady(msg);
        case "result": return this.handleResult(msg);
        case "event": return this.handleEvent(msg);
        case "error": return this.handleError(msg);
        case "summary": return this.handleSummary(msg);
        case "checkpoint": return this.handleCheckpoint(msg);
        default: log(`unknown message type ${msg.type}`, "warn");
      }
    }

    handleCheckpoint(msg) {
      if (msg.resume_token) this.resumeToken = msg.resume_token;
      // audio before msg.samples is durable on the server: no replay will need it
      const durable = (f) => f.start + f.pcm.byteLength / this.bps <= msg.samples;
      while (this.replay.length && durable(this.replay[0])) this.replay.shift();
    }

    handleReady(msg) {
      if (msg.resume_token) this.resumeToken = msg.resume_token;
      if (msg.resumed) return this.handleResumed(msg);
      this.readyMsg = msg;
      demo.ready = msg;
      labels = msg.labels && msg.labels.length ? msg.labels : labels;
      threshold = typeof msg.threshold === "number" ? msg.threshold : threshold;
      this.hop = msg.hop_samples || this.hop;
      this.frame = msg.frame_samples || this.frame;
      if (msg.sample_rate && msg.sample_rate !== this.modelRate) {
        this.lastError = `the model runs at ${msg.sample_rate} Hz, the page expected ${this.modelRate} Hz`;
        this.ws.close(1000);
        return;
      }
      ui.session.textContent = msg.session_id;
      ui.session.title = `${msg.model}/${msg.version}, hop ${msg.hop_samples} samples`;
      log(`connected: session ${msg.session_id}, ${msg.model}/${msg.version}, ` +
        `hop ${msg.hop_samples} samples, threshold ${threshold}; sending ${this.encoding} at ${this.rate} Hz` +
        (this.rate !== this.modelRate ? " (the server resamples)" : ""));
      if (this.onReady) this.onReady(msg);
      this.onReady = this.onRefused = null;
    }

    handleResumed(msg) {
      // Replay what the server lacks (from replay_from_sample), then stream on.
      this.resuming = false;
      this.attempts = 0;
      demo.resumes += 1;
      this.skipEvents = Math.max(0, this.eventsSeen - (msg.events_sent || 0));
      const from = msg.replay_from_sample;
      for (const f of this.replay) {
        const end = f.start + f.pcm.byteLength / this.bps;
        if (end <= from) continue;
        this.ws.send(f.pcm.slice(Math.max(0, from - f.start) * this.bps));
      }
      ui.session.textContent = msg.session_id;
      log(`resumed: session ${msg.session_id}, replayed from sample ${from}`);
      setState("streaming", "Resumed after the connection was lost.");
    }

    handleResult(msg) {
      if (msg.step < this.nextStep) return; // re-sent after a resume: already shown
      if (msg.step !== this.nextStep) demo.gapFree = false;
      this.nextStep = msg.step + 1;
      const now = performance.now();
      const sent = this.sendTimes.get(msg.step);
      if (sent !== undefined) {
        this.sendTimes.delete(msg.step);
        demo.latencies.push(now - sent);
        if (demo.latencies.length > 2000) demo.latencies.splice(0, demo.latencies.length - 2000);
      }
      // Steps flushed at the end have no completing frame; drop stale timestamps.
      if (this.sendTimes.size > 1000) {
        for (const k of this.sendTimes.keys()) if (k < msg.step) this.sendTimes.delete(k);
      }
      const s = labels.map((l) => (msg.scores && typeof msg.scores[l] === "number" ? msg.scores[l] : NaN));
      points.push({ t: msg.time, s });
      tNow = Math.max(tNow, msg.time);
      while (points.length && points[0].t < tNow - WINDOW_S - 1) points.shift();
      demo.results += 1;
      demo.lastScores = msg.scores;
      dirty = true;
    }

    handleEvent(msg) {
      if (this.skipEvents > 0) {
        this.skipEvents -= 1; // re-sent after a resume
        return;
      }
      this.eventsSeen += 1;
      const ev = { event: msg.event, label: msg.label, time: msg.time };
      demo.events.push(ev);
      if (msg.event === "start") {
        regions.push({ label: msg.label, start: msg.time, end: null });
      } else if (msg.event === "end") {
        const open = [...regions].reverse().find((r) => r.label === msg.label && r.end === null);
        if (open) open.end = msg.time;
        else regions.push({ label: msg.label, start: msg.time, end: msg.time });
      }
      while (regions.length > 200) regions.shift();
      const li = document.createElement("li");
      li.className = msg.event;
      li.textContent = `${msg.label} ${msg.event} at ${Number(msg.time).toFixed(2)} s`;
      ui.events.prepend(li);
      dirty = true;
    }

    handleError(msg) {
      const text = ERROR_TEXT[msg.code] || msg.message || msg.code;
      demo.errors.push({ code: msg.code, message: msg.message, step: msg.step });
      this.lastError = `${text} (${msg.code}${msg.message ? ": " + msg.message : ""})`;
      log(this.lastError, "error");
      if (this.readyMsg) ui.message.textContent = text;
    }

    handleSummary(msg) {
      demo.summary = msg;
      log(`summary: ${msg.steps} steps over ${Number(msg.duration).toFixed(2)} s, ` +
        `${(msg.events || []).length} events, ${msg.failed_steps} failed`);
    }

    onClose(e) {
      demo.closes.push({ code: e.code, reason: e.reason, clean: e.wasClean });
      if (!this.ending && this.readyMsg && this.resumeToken && this.attempts < 60 &&
          (RESUMABLE.has(e.code) || this.resuming || e.code === 4465)) {
        // Keep the audio running and buffered; reconnect with the token (backoff).
        this.resuming = true;
        this.attempts += 1;
        const delay = Math.min(2000, 100 * 2 ** Math.min(this.attempts, 5));
        if (this.attempts === 1) {
          log(`connection lost (${e.code}); resuming`, "warn");
          setState("streaming", CLOSE_TEXT[4100]);
        }
        setTimeout(() => { if (!this.ending) this.connect().catch(() => {}); }, delay);
        return;
      }
      this.closed = true;
      this.teardownAudio();
      if (sess === this) sess = null;
      let message;
      let state = "error";
      if (e.code === 1000 && this.ending) {
        state = "closed";
        const n = demo.summary ? demo.summary.steps : demo.results;
        message = `Session ended normally: ${n} steps scored, ${demo.events.length} events.`;
        if (this.lastError) message += ` Last server error: ${this.lastError}`;
      } else if (e.code === 1006 && !this.opened) {
        message = CLOSE_TEXT[1006];
      } else if (e.code === 1006) {
        message = "The connection was lost (1006).";
      } else {
        message = CLOSE_TEXT[e.code] || `The connection closed with code ${e.code}.`;
        if (this.lastError) message += " " + this.lastError;
        else if (e.reason) message += ` (${e.reason})`;
      }
      log(`closed ${e.code}${e.reason ? " " + e.reason : ""}`, state === "error" ? "error" : "");
      if (state === "error") demo.errors.push({ code: "close_" + e.code, message });
      setState(state, message, state === "error");
      if (this.onRefused) this.onRefused(new Error(message));
      this.onReady = this.onRefused = null;
      dirty = true;
    }

    // Stop the audio, let the worklet hand over what it already framed, then send
    // {"type":"end"}: the server scores the rest, sends the summary and closes 1000.
    async end(reason) {
      if (this.ending || this.closed) return;
      const ws = this.ws;
      if (!ws || ws.readyState !== WebSocket.OPEN || !this.readyMsg) {
        this.ending = true;
        if (ws) ws.close();
        this.teardownAudio();
        return;
      }
      setState("ending", reason || "Finishing: scoring the buffered audio…");
      if (this.source) this.source.disconnect();
      if (this.node) {
        await Promise.race([
          new Promise((resolve) => { this.onDrained = resolve; this.node.port.postMessage({ type: "drain" }); }),
          new Promise((resolve) => setTimeout(resolve, 500)),
        ]);
      }
      this.ending = true;
      if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "end" }));
      this.teardownAudio();
      setTimeout(() => { if (!this.closed) ws.close(); }, 10000);
    }

    teardownAudio() {
      if (this.stream) for (const t of this.stream.getTracks()) t.stop();
      this.stream = null;
      try { if (this.source) this.source.disconnect(); } catch (_) { /* already */ }
      if (this.node) this.node.port.postMessage({ type: "stop" });
      if (this.ctx && this.ctx.state !== "closed") this.ctx.close().catch(() => {});
      this.level = 0;
    }
  }

  async function begin(kind, prepareSource) {
    const model = selectedModel();
    if (!model) {
      fail("Choose a model first.");
      return;
    }
    if (!window.isSecureContext || !window.AudioWorkletNode) {
      fail("This page needs a secure context (https or localhost) and a browser with AudioWorklet.");
      return;
    }
    resetView();
    let s;
    try {
      s = new Session(model, kind);
    } catch (e) {
      fail("Could not open audio: " + e.message);
      return;
    }
    sess = s;
    demo.source = kind;
    setState("checking", "Checking the server…");
    const pre = await fetchModels();
    if (!pre.ok) {
      s.teardownAudio();
      sess = null;
      fail(pre.message, pre.code);
      return;
    }
    try {
      await s.setupAudio();
      await prepareSource(s);
    } catch (e) {
      s.teardownAudio();
      sess = null;
      const msg = e && e.name === "NotAllowedError" ? "Microphone permission was denied."
        : e && e.name === "NotFoundError" ? "No microphone was found."
        : e && e.name === "NotSupportedError" && kind === "microphone"
          ? `This browser cannot open the microphone at ${s.rate} Hz; use a Chromium-based ` +
            "browser, or stream a WAV file instead."
        : (kind === "file" ? "Could not read the file: " : "Could not start audio: ") + (e.message || e);
      fail(msg);
      return;
    }
    setState("connecting", "Connecting…");
    try {
      await s.connect();
    } catch (_) {
      return; // onClose showed why
    }
    if (s.closed) return;
    s.source.connect(s.node);
    if (s.kind === "file") {
      s.source.connect(s.ctx.destination); // hear what is scored
      s.source.onended = () => s.end("File finished: scoring the buffered audio…");
      s.source.start();
    }
    setState("streaming", kind === "file" ? `Streaming ${s.fileName} at real-time pace…`
      : "Streaming from the microphone… speak!");
  }

  ui.start.addEventListener("click", () => begin("microphone", async (s) => {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      throw new Error("this browser has no microphone access (getUserMedia)");
    }
    s.stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
    });
    s.source = s.ctx.createMediaStreamSource(s.stream);
  }));

  ui.stop.addEventListener("click", () => { if (sess) sess.end(); });

  function playFile(file) {
    if (!file) return;
    begin("file", async (s) => {
      // decodeAudioData resamples to the context's rate (the device's or the model's); the worklet node
      // downmixes to mono (channelCount 1, explicit), so the file takes the mic's path.
      const data = await file.arrayBuffer();
      const buffer = await s.ctx.decodeAudioData(data);
      s.fileName = `${file.name} (${buffer.duration.toFixed(1)} s)`;
      s.source = s.ctx.createBufferSource();
      s.source.buffer = buffer;
    });
  }

  ui.file.addEventListener("change", () => {
    const f = ui.file.files && ui.file.files[0];
    ui.file.value = "";
    playFile(f);
  });
  ui.drop.addEventListener("dragover", (e) => { e.preventDefault(); ui.drop.classList.add("over"); });
  ui.drop.addEventListener("dragleave", () => ui.drop.classList.remove("over"));
  ui.drop.addEventListener("drop", (e) => {
    e.preventDefault();
    ui.drop.classList.remove("over");
    if (sess) return;
    playFile(e.dataTransfer && e.dataTransfer.files[0]);
  });
  // Dropping a file anywhere else must not navigate away from the page.
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());

  // -------------------------------------------------------------------------- stats
  function percentile(sorted, p) {
    if (!sorted.length) return null;
    const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil(p / 100 * sorted.length) - 1));
    return sorted[i];
  }

  function updateStats() {
    ui.results.textContent = String(demo.results);
    ui.stime.textContent = tNow.toFixed(1) + " s";
    const recent = demo.latencies.slice(-LAT_WINDOW).sort((a, b) => a - b);
    demo.p50 = percentile(recent, 50);
    demo.p95 = percentile(recent, 95);
    ui.latency.textContent = demo.p50 === null ? "—"
      : `${demo.p50.toFixed(1)} / ${demo.p95.toFixed(1)} ms`;
    if (demo.lastScores) {
      ui.score.textContent = Object.entries(demo.lastScores)
        .map(([k, v]) => `${k} ${Number(v).toFixed(2)}`).join("  ");
    }
    const level = sess ? sess.level : 0;
    ui.level.style.width = Math.min(100, Math.round(Math.sqrt(level) * 100)) + "%";
    if (sess) sess.level *= 0.92;
  }

  // -------------------------------------------------------------------------- plot
  function draw() {
    const c = ui.plot;
    const dpr = window.devicePixelRatio || 1;
    const w = Math.max(100, c.clientWidth);
    const h = Math.max(100, c.clientHeight);
    if (c.width !== Math.round(w * dpr) || c.height !== Math.round(h * dpr)) {
      c.width = Math.round(w * dpr);
      c.height = Math.round(h * dpr);
    }
    const g = c.getContext("2d");
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, w, h);
    const L = 40, R = 10, T = 22, B = 24;
    const pw = w - L - R, ph = h - T - B;
    const t1 = Math.max(tNow, WINDOW_S), t0 = t1 - WINDOW_S;
    const x = (t) => L + (t - t0) / WINDOW_S * pw;
    const y = (v) => T + (1 - v) * ph;

    // event regions
    for (const r of regions) {
      const a = Math.max(r.start, t0), b = Math.min(r.end === null ? tNow : r.end, t1);
      if (b <= a) continue;
      const i = Math.max(0, labels.indexOf(r.label));
      g.fillStyle = COLORS[i % COLORS.length] + "33";
      g.fillRect(x(a), T, x(b) - x(a), ph);
      g.fillStyle = COLORS[i % COLORS.length] + "aa";
      if (r.start >= t0) g.fillRect(x(r.start) - 1, T, 2, ph);
    }

    // grid and axes
    g.strokeStyle = "#2a3440";
    g.fillStyle = "#8b98a5";
    g.lineWidth = 1;
    g.font = "11px system-ui, sans-serif";
    g.textAlign = "right";
    g.textBaseline = "middle";
    for (const v of [0, 0.25, 0.5, 0.75, 1]) {
      g.beginPath(); g.moveTo(L, y(v)); g.lineTo(L + pw, y(v)); g.stroke();
      g.fillText(v.toFixed(2), L - 4, y(v));
    }
    g.textAlign = "center";
    g.textBaseline = "top";
    for (let t = Math.ceil(t0); t <= t1 + 1e-9; t += 1) {
      g.beginPath(); g.moveTo(x(t), T); g.lineTo(x(t), T + ph); g.stroke();
      g.fillText(t + " s", x(t), T + ph + 5);
    }

    // threshold
    g.save();
    g.setLineDash([6, 4]);
    g.strokeStyle = "#f85149";
    g.lineWidth = 1.5;
    g.beginPath(); g.moveTo(L, y(threshold)); g.lineTo(L + pw, y(threshold)); g.stroke();
    g.restore();
    g.fillStyle = "#f85149";
    g.textAlign = "right";
    g.textBaseline = "bottom";
    g.fillText(`threshold ${threshold.toFixed(2)}`, L + pw - 4, y(threshold) - 2);

    // scores
    g.lineWidth = 2;
    g.lineJoin = "round";
    labels.forEach((label, i) => {
      g.strokeStyle = COLORS[i % COLORS.length];
      g.beginPath();
      let pen = false;
      for (const p of points) {
        if (p.t < t0 - 0.1) continue;
        const v = p.s[i];
        if (!Number.isFinite(v)) { pen = false; continue; }
        const px = x(p.t), py = y(Math.min(1, Math.max(0, v)));
        if (pen) g.lineTo(px, py); else g.moveTo(px, py);
        pen = true;
      }
      g.stroke();
    });

    // legend / empty state
    g.textAlign = "left";
    g.textBaseline = "top";
    labels.forEach((label, i) => {
      g.fillStyle = COLORS[i % COLORS.length];
      g.fillRect(L + i * 110, 8, 14, 3);
      g.fillStyle = "#e6edf3";
      g.fillText(label, L + 18 + i * 110, 3);
    });
    const shaded = regions.length ? "shaded: event start → end" : "";
    g.fillStyle = "#8b98a5";
    g.textAlign = "right";
    g.fillText(shaded, L + pw, 3);
    if (!points.length) {
      g.fillStyle = "#8b98a5";
      g.textAlign = "center";
      g.textBaseline = "middle";
      g.font = "14px system-ui, sans-serif";
      g.fillText("scores appear here: press Start microphone or drop a WAV file", L + pw / 2, y(0.75));
    }
  }

  function frame() {
    updateStats();
    if (dirty) {
      dirty = false;
      draw();
    }
    requestAnimationFrame(frame);
  }

  window.addEventListener("resize", () => { dirty = true; });
  requestAnimationFrame(frame);
  loadModels();
})();

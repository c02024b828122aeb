// Lookback demo: AudioWorkletProcessor that turns the render quanta (128 samples, mono, at
// the AudioContext's rate) into wire messages and posts them to the main thread, which
// sends them as they are.
//
// Two forms (processorOptions), chosen by the page:
// - the context's native rate (44.1 or 48 kHz): pcm_f32le, `quanta` render quanta a message
//   (about 8 ms); the server resamples them to the model's rate (any whole number of
//   samples is a valid message then);
// - the model's rate (the browser resamples; the fallback): pcm_s16le, one quantum = one
//   128-sample wire frame a message, no re-framing.

class PcmFramer extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = (options && options.processorOptions) || {};
    this.float = opts.encoding === "pcm_f32le";
    this.quanta = Math.max(1, opts.quanta || 1);
    this.buf = null;
    this.fill = 0;
    this.peak = 0;
    this.running = true;
    this.port.onmessage = (e) => {
      const msg = e.data || {};
      if (msg.type === "drain") {
        this.post(); // a partly filled message goes too: nothing taken is held back
        // Messages on a port are ordered: every frame posted before this reply
        // reaches the main thread before it.
        this.port.postMessage({ type: "drained" });
      } else if (msg.type === "stop") {
        this.running = false;
      }
    };
  }

  post() {
    if (!this.fill) return;
    const out = this.fill === this.buf.length ? this.buf : this.buf.slice(0, this.fill);
    this.port.postMessage({ type: "frame", pcm: out.buffer, peak: this.peak }, [out.buffer]);
    this.buf = null;
    this.fill = 0;
    this.peak = 0;
  }

  process(inputs) {
    if (!this.running) return false;
    const input = inputs[0];
    // No connected or active input (e.g. a file source that ended): nothing to send.
    if (!input || input.length === 0 || !input[0]) return true;
    const ch = input[0]; // the node downmixes to one channel (channelCount 1, explicit)
    const n = ch.length; // 128 in every browser that ships AudioWorklet
    if (!this.buf) {
      this.buf = this.float ? new Float32Array(n * this.quanta) : new Int16Array(n * this.quanta);
    }
    const buf = this.buf;
    const at = this.fill;
    let peak = this.peak;
    for (let i = 0; i < n; i++) {
      let s = ch[i];
      if (!(s === s)) s = 0; // NaN guard: never send garbage to the model
      if (s > 1) s = 1;
      else if (s < -1) s = -1;
      const a = s < 0 ? -s : s;
      if (a > peak) peak = a;
      buf[at + i] = this.float ? s : Math.round(s * 32767);
    }
    this.peak = peak;
    this.fill = at + n;
    if (this.fill + n > buf.length) this.post();
    return true;
  }
}

registerProcessor("lookback-pcm-framer", PcmFramer);

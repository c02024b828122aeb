// Lookback demo: AudioWorkletProcessor that turns each 128-sample render quantum
// (float32, mono, at the AudioContext's rate = the model's 16 kHz) into one
// pcm_s16le wire frame and posts it to the main thread, which sends it as is.
//
// The render quantum of Web Audio is 128 frames, exactly Lookback's wire frame, so
// one quantum = one binary WebSocket message, with no re-framing.

class PcmFramer extends AudioWorkletProcessor {
  constructor() {
    super();
    this.running = true;
    this.port.onmessage = (e) => {
      const msg = e.data || {};
      if (msg.type === "drain") {
        // Messages on a port are ordered: every frame posted before this reply
        // reaches the main thread before it.
        this.port.postMessage({ type: "drained" });
      } else if (msg.type === "stop") {
        this.running = false;
      }
    };
  }

  process(inputs) {
    if (!this.running) return false;
    const input = inputs[0];
    // No connected or active input (e.g. a file source that ended): nothing to send.
    if (!input || input.length === 0 || !input[0]) return true;
    const ch = input[0]; // the node downmixes to one channel (channelCount 1, explicit)
    const n = ch.length; // 128 in every browser that ships AudioWorklet
    const pcm = new Int16Array(n);
    let peak = 0;
    for (let i = 0; i < n; i++) {
      let s = ch[i];
      if (!(s === s)) s = 0; // NaN guard: never send garbage to the model
      if (s > 1) s = 1;
      else if (s < -1) s = -1;
      const a = s < 0 ? -s : s;
      if (a > peak) peak = a;
      pcm[i] = Math.round(s * 32767);
    }
    this.port.postMessage({ type: "frame", pcm: pcm.buffer, peak }, [pcm.buffer]);
    return true;
  }
}

registerProcessor("lookback-pcm-framer", PcmFramer);

"""``convert``: four models written in plain PyTorch become streaming twins whose stream,
sequence graph and the original module's batch forward agree; what cannot stream is
refused with the reason (and the look-ahead a non-causal layer would need)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lookback.streaming import Frontend, export, mel_basis
from lookback.streaming.convert import ConversionError, ConvertedModel, convert
from tests.streaming.stock_models import CRNN, LstmVAD, PlainVAD, TCResNet8, randomise
from tests.streaming.support import TOL, max_diff, random_chunks

STOCK: dict[str, tuple[Callable[[], nn.Module], list[str] | None, int, list[str]]] = {
    # name: (build, labels, hop, state names)
    "plain-vad": (PlainVAD, ["speech"], 128, ["conv", "gru"]),
    "lstm-vad": (LstmVAD, ["speech"], 128, ["lstm_h", "lstm_c"]),
    "tc-resnet8": (
        TCResNet8,
        [f"kw{i}" for i in range(12)],
        1024,
        ["stem"] + [f"blocks_{b}_conv{c}" for b in range(3) for c in (1, 2)],
    ),
    "crnn": (CRNN, ["a", "b"], 256, ["conv1", "conv2", "gru"]),
}


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def stream_dir(folder: Path, audio: np.ndarray, chunks: list[int]) -> np.ndarray:
    """A model directory run on ``audio [B, context + N*hop]`` in chunks of hops: a chunk of
    one hop on the step graph, longer ones on the sequence graph. Returns [B, N, L]."""
    spec = json.loads((folder / "model.json").read_text())
    hop, ctx = spec["hop_samples"], spec["context_samples"]
    step, seq = _session(folder / "model.onnx"), _session(folder / "sequence.onnx")
    b = audio.shape[0]
    states = {}
    for s in spec["states"]:
        shape = list(s["shape"])
        shape.insert(s["batch_axis"], b)
        states[s["input"]] = np.full(shape, s["initial"], np.float32)
    outs, t = [], 0
    for c in chunks:
        sess = step if c == 1 else seq
        got = sess.run(None, {"audio": audio[:, t * hop : ctx + (t + c) * hop], **states})
        y = got[0]
        y = y[:, None] if c == 1 else y  # step [B, L]; sequence [B, N] or [B, N, L]
        outs.append(y if y.ndim == 3 else y[:, :, None])
        names = [o.name for o in sess.get_outputs()]
        states = {s["input"]: got[names.index(s["output"])] for s in spec["states"]}
        t += c
    return np.concatenate(outs, axis=1)


def clips(model: ConvertedModel, batch: int, hops: int, seed: int) -> np.ndarray:
    """Noise at many levels and tones, with the context's zeros in front, as a stream starts."""
    rng = np.random.default_rng(seed)
    n = hops * model.hop_samples
    t = np.arange(n) / 16000
    rows = []
    for i in range(batch):
        level = 10 ** rng.uniform(-3, -0.5)
        x = (
            rng.standard_normal(n) * level
            if i % 2
            else np.sin(2 * np.pi * rng.uniform(100, 4000) * t) * level
        )
        rows.append(np.concatenate([np.zeros(model.context_samples), x]))
    return np.asarray(rows, np.float32)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[ConvertedModel, Path]]:
    root = tmp_path_factory.mktemp("converted")
    out = {}
    for name, (build, labels, _hop, _states) in STOCK.items():
        model = convert(randomise(build()), labels=labels)
        report = export(model, root / name / "1", name=name)
        assert report.ok, report.text()
        assert report.checks[-1].name == "onnx == torch"  # vs the ORIGINAL module's batch forward
        out[name] = (model, root / name / "1")
    return out


@pytest.mark.parametrize("name", list(STOCK))
def test_stock_model_converts_with_the_states_it_needs(
    name: str, exported: dict[str, tuple[ConvertedModel, Path]]
) -> None:
    model, folder = exported[name]
    _build, labels, hop, states = STOCK[name]
    spec = json.loads((folder / "model.json").read_text())
    assert spec["hop_samples"] == hop and spec["context_samples"] == 384
    assert [s["input"] for s in spec["states"]] == states
    assert spec["outputs"][0]["labels"] == labels
    assert model.state_names() == states


@pytest.mark.parametrize("name", list(STOCK))
def test_stream_equals_sequence_equals_the_pytorch_batch_forward(
    name: str, exported: dict[str, tuple[ConvertedModel, Path]]
) -> None:
    """Batches of 1, 5 and 64, chunk boundaries at random (one hop on the step graph, more
    on the sequence graph), against the module the user wrote, run on the whole clips."""
    model, folder = exported[name]
    rng = np.random.default_rng(7)
    hops = 12 if model.hop_samples > 256 else 20
    for batch in (1, 5, 64):
        audio = clips(model, batch, hops, seed=batch)
        with torch.no_grad():
            ref = model.reference(torch.from_numpy(audio)).numpy()  # [B, N, L]
        assert ref.shape == (batch, hops, len(model.labels))
        whole = stream_dir(folder, audio, [hops])
        assert max_diff(whole, ref) <= TOL
        hop_by_hop = stream_dir(folder, audio, [1] * hops)
        assert max_diff(hop_by_hop, ref) <= TOL
        chunked = stream_dir(folder, audio, random_chunks(hops, 1, rng))
        assert max_diff(chunked, ref) <= TOL


def test_the_default_model_in_plain_pytorch_reproduces_the_shipped_scores(tmp_path: Path) -> None:
    """lookback-vad/1's trained tensors loaded into PlainVAD (no Lookback layer in it),
    converted and exported: its scores are the shipped model's."""
    import soundfile as sf

    root = Path(__file__).resolve().parents[2]
    with np.load(root / "model_store/recipes/lookback-vad-1.weights.npz") as npz:
        w = {k: torch.from_numpy(npz[k].copy()) for k in npz.files}
    plain = PlainVAD()
    basis = mel_basis(48, 512, 16000, 60.0, 7600.0, 128)
    plain.load_state_dict(
        {
            "filterbank.weight": torch.from_numpy(basis[:, None, :]),
            "shift": w["frontend.shift"],
            "scale": w["frontend.scale"],
            "conv.weight": w["body.layers.0.conv.weight"],
            "conv.bias": w["body.layers.0.conv.bias"],
            **{
                f"gru.{k}": w[f"body.layers.2.rnn.{k}"]
                for k in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
            },
            "head.weight": w["body.layers.3.linear.weight"],
            "head.bias": w["body.layers.3.linear.bias"],
        }
    )
    model = convert(plain, labels=["speech"], hop=128)
    out = tmp_path / "plain-vad" / "1"
    assert export(model, out, name="plain-vad").ok
    clip = sf.read(str(root / "tests/fixtures/audio/lookback_speech_noise.wav"), dtype="int16")[0]
    clip = clip[: 16000 * 4 // 128 * 128].astype(np.float32) / 32768.0
    audio = np.concatenate([np.zeros(384, np.float32), clip])[None]
    hops = clip.size // 128
    shipped = stream_dir(root / "model_store/lookback-vad/1", audio, [hops])
    ours = stream_dir(out, audio, random_chunks(hops, 1, np.random.default_rng(3)))
    assert shipped.max() > 0.9 and shipped.min() < 0.1  # speech and silence both scored
    assert max_diff(ours, shipped) <= TOL


class FeatureModel(nn.Module):
    """Takes the Lookback front end's features [B, T, F]: dilated depthwise conv, LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv1d(24, 24, 3, dilation=2, groups=24)
        self.pw = nn.Conv1d(24, 16, 1)
        self.pool = nn.MaxPool1d(2)
        self.norm = nn.LayerNorm(16)
        self.gru = nn.GRU(16, 8, num_layers=2, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = feats.transpose(1, 2)
        x = F.gelu(self.pw(self.dw(F.pad(x, (4, 0)))))
        x = self.pool(F.pad(x, (1, 0)))  # a causal max over 2 frames, stride 2
        y, _ = self.gru(self.norm(x.transpose(1, 2)))
        return torch.log_softmax(self.out(y), dim=-1)


def test_a_module_over_lookback_features_with_pooling_and_depthwise_convs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = convert(FeatureModel(), frontend=Frontend(mel_basis(24), 128), labels=["x", "y", "z"])
    assert model.hop_samples == 256
    assert model.state_names() == ["dw", "pool", "gru"]
    report = export(model, tmp_path / "f" / "1", name="f")
    assert report.ok, report.text()


class Wrap(nn.Module):
    """A filterbank, then ``body`` on [B, 8, T]."""

    def __init__(
        self, body: Callable[[nn.ModuleDict, torch.Tensor], torch.Tensor], **mods: nn.Module
    ) -> None:
        super().__init__()
        self.fb = nn.Conv1d(1, 8, 256, stride=128)
        self.mods = nn.ModuleDict(mods)
        self.body = body

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return self.body(self.mods, self.fb(audio.unsqueeze(1)))


REFUSED = [
    (
        "same padding",
        lambda m, x: m["c"](x),
        {"c": nn.Conv1d(8, 1, 5, padding="same")},
        r"padding='same' centres the kernel: it looks 2 frame\(s\) ahead .* Pad 4 frames on the left",
    ),
    (
        "symmetric padding, no crop",
        lambda m, x: m["c"](x),
        {"c": nn.Conv1d(8, 1, 3, padding=2)},
        r"padding=2 on the time axis pads both sides: without cropping the last 2 outputs",
    ),
    (
        "right padding",
        lambda m, x: m["c"](F.pad(x, (1, 1))),
        {"c": nn.Conv1d(8, 1, 3)},
        r"pads 1 frame\(s\) on the RIGHT of the time axis",
    ),
    (
        "too little left padding",
        lambda m, x: m["c"](F.pad(x, (1, 0))),
        {"c": nn.Conv1d(8, 1, 3)},
        r"looks 1 frame\(s\) ahead \(non-causal\): pad 2 frames on the left",
    ),
    (
        "bidirectional GRU",
        lambda m, x: m["g"](x.transpose(1, 2))[0],
        {"g": nn.GRU(8, 4, batch_first=True, bidirectional=True)},
        r"bidirectional GRU reads the clip backwards from its end",
    ),
    (
        "the RNN's final state",
        lambda m, x: m["g"](x.transpose(1, 2))[1].transpose(0, 1),
        {"g": nn.GRU(8, 4, batch_first=True)},
        r"h_n is the state after the WHOLE clip",
    ),
    (
        "global average pooling",
        lambda m, x: m["l"](x.mean(dim=2)),
        {"l": nn.Linear(8, 1)},
        r"reduces over the time axis \(a global pooling over the clip\)",
    ),
    (
        "adaptive pooling",
        lambda m, x: m["p"](x),
        {"p": nn.AdaptiveAvgPool1d(1)},
        r"AdaptiveAvgPool1d reduces over the time axis",
    ),
    (
        "linear over time",
        lambda m, x: m["l"](x),
        {"l": nn.Linear(96, 96)},
        r"the module fails on a clip of 192 frames .* a Linear over time",
    ),
    (
        "a reversed clip",
        lambda m, x: torch.flip(x, dims=[2]),
        {},
        r"not convertible \(flip\)",
    ),
]


@pytest.mark.parametrize(("what", "body", "mods", "message"), REFUSED, ids=[r[0] for r in REFUSED])
def test_refuses_what_cannot_stream_and_says_why(
    what: str,
    body: Callable[[nn.ModuleDict, torch.Tensor], torch.Tensor],
    mods: dict[str, nn.Module],
    message: str,
) -> None:
    with pytest.raises(ConversionError, match=message):
        convert(Wrap(body, **mods))


class CellLoop(nn.Module):
    """A GRUCell stepped by a Python loop over the frames: fx cannot trace the loop."""

    def __init__(self) -> None:
        super().__init__()
        self.fb = nn.Conv1d(1, 8, 256, stride=128)
        self.cell = nn.GRUCell(8, 4)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        x = self.fb(audio.unsqueeze(1)).transpose(1, 2)
        h = torch.zeros(x.shape[0], 4)
        ys = []
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
            ys.append(h)
        return torch.stack(ys, 1)


def test_refuses_a_python_loop_over_the_frames() -> None:
    with pytest.raises(
        ConversionError, match=r"torch\.fx cannot trace CellLoop: .* loops over a tensor's length"
    ):
        convert(CellLoop())


def test_refuses_merging_the_batch_axis() -> None:
    def body(m: nn.ModuleDict, x: torch.Tensor) -> torch.Tensor:
        b, c, t = x.shape
        y = m["l"](x.transpose(1, 2).reshape(b * t, c))
        return y.reshape(b, t, -1)

    with pytest.raises(ConversionError, match=r"the batch axis is merged with another axis"):
        convert(Wrap(body, l=nn.Linear(8, 1)))


def test_refuses_a_module_without_a_filterbank_or_frontend() -> None:
    with pytest.raises(ConversionError, match=r"no front end: .* nn\.Conv1d\(1, D, window, stride=hop\)"):
        convert(nn.Sequential(nn.Linear(4, 1)))


def test_refuses_a_hop_that_differs_from_the_one_asked() -> None:
    with pytest.raises(ConversionError, match=r"the module's hop is 1024 samples .* not 128"):
        convert(randomise(TCResNet8()), hop=128)


def test_the_worked_example_in_the_docs_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/byom.md's "Convert a model you already trained" example, as written (under 30 lines)."""
    doc = (Path(__file__).resolve().parents[2] / "docs/byom.md").read_text()
    section = doc[doc.index("## Convert a model you already trained") :]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert len(code.strip().splitlines()) < 30
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(code.split("model = KWS()")[0], ns)  # the class alone, to save weights as if trained
    torch.save(ns["KWS"]().state_dict(), tmp_path / "kws.pt")
    exec(code, {})
    out = capsys.readouterr().out
    assert "['conv', 'gru']" in out and "[ok  ] onnx == torch" in out
    assert (tmp_path / "model_store/kws/1/model.json").is_file()


CONVERTS = [
    # (what, body on the filterbank's [B, 8, T], modules, expected states as (shape, batch axis))
    (
        "patch down-sampler k=2 s=2: no state",
        lambda m, x: m["c"](x),
        {"c": nn.Conv1d(8, 4, 2, stride=2)},
        [],
    ),
    (
        "k=9 s=2 aligned on the newest frame: 7 frames",
        lambda m, x: m["c"](F.pad(x, (7, 0))),
        {"c": nn.Conv1d(8, 4, 9, stride=2)},
        [((8, 7), 0)],
    ),
    (
        "k=9 s=2 aligned on the oldest frame: 8 frames",
        lambda m, x: m["c"](F.pad(x, (8, 0))),
        {"c": nn.Conv1d(8, 4, 9, stride=2)},
        [((8, 8), 0)],
    ),
    (
        "dilated depthwise then strided average pool",
        lambda m, x: m["p"](F.pad(m["c"](F.pad(x, (6, 0))), (2, 0))),
        {"c": nn.Conv1d(8, 8, 4, dilation=2, groups=8), "p": nn.AvgPool1d(3, stride=2)},
        [((8, 6), 0), ((8, 2), 0)],
    ),
    (
        "Conv2d over [B, C, T, F] (time on axis 2), frequency padded by the conv",
        lambda m, x: m["c"](F.pad(x.transpose(1, 2).unsqueeze(1), (0, 0, 2, 0))).transpose(1, 2).flatten(2),
        {"c": nn.Conv2d(1, 2, (3, 3), padding=(0, 1))},
        [((1, 2, 8), 0)],
    ),
    (
        "concat along channels of a conv and a delayed copy",
        lambda m, x: torch.cat([m["c"](F.pad(x, (2, 0))), x], dim=1),
        {"c": nn.Conv1d(8, 4, 3)},
        [((8, 2), 0)],
    ),
]


@pytest.mark.parametrize(("what", "body", "mods", "states"), CONVERTS, ids=[c[0] for c in CONVERTS])
def test_look_back_ops_get_exactly_the_state_they_need(
    what: str,
    body: Callable[[nn.ModuleDict, torch.Tensor], torch.Tensor],
    mods: dict[str, nn.Module],
    states: list[tuple[tuple[int, ...], int]],
    tmp_path: Path,
) -> None:
    torch.manual_seed(1)
    model = convert(Wrap(body, **mods))
    assert [(d.shape, d.batch_axis) for d in model.state_decls()] == states
    report = export(model, tmp_path / "m" / "1", name="m")
    assert report.ok, report.text()

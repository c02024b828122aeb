"""``lookback serve | consume | models | stream | score | protocol | docs`` (and ``loadtest``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from lookback.settings import Settings


def _progress(done: float, total: float, label: str) -> None:
    """A one-line progress bar on stderr, only for terminals and long files."""
    if not sys.stderr.isatty() or total <= 0:
        return
    width = 30
    frac = min(1.0, done / total)
    bar = "#" * int(frac * width)
    sys.stderr.write(f"\r{label} [{bar:<{width}}] {frac * 100:5.1f}%")
    if frac >= 1.0:
        sys.stderr.write("\n")
    sys.stderr.flush()


def cmd_serve(args: argparse.Namespace) -> int:
    from lookback.workers import serve

    overrides: dict[str, Any] = {}
    for name in ("host", "port", "model_store", "default_model", "workers"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    return serve(Settings(**overrides))


def cmd_consume(args: argparse.Namespace) -> int:
    from lookback.sources.run import main as consume

    settings = Settings()
    urls = list(args.url) or settings.sources
    if not urls:
        raise SystemExit("lookback consume: give a source URL or set LOOKBACK_SOURCES")
    consume(settings, urls)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from lookback.engine.store import discover, open_graphs, open_multistep

    if args.action == "check":
        return _models_check(args)
    if args.action == "convert":
        return _models_convert(args)
    settings = Settings(**({"model_store": args.model_store} if args.model_store else {}))
    if args.action == "import":
        from lookback.engine.importer import import_model

        path = import_model(args.name, settings.model_store)
        print(f"imported {args.name} into {path}")
        return 0
    rows = []
    broken: dict[str, str] = {}
    for sm in discover(settings.model_store, broken):
        entry: dict[str, Any] = {"key": sm.spec.key, "path": str(sm.path)}
        try:  # what the server opens: both graphs and the multi-step Loop graph
            cpu: dict[str, Any] = {"intra_op_threads": 1, "inter_op_threads": 1}
            step, seq = open_graphs(sm, providers=settings.providers, **cpu)
            open_multistep(sm, providers=settings.providers, **cpu)
            entry.update(provider=step.provider, status="ok", sequence_graph=seq is not None)
        except Exception as exc:  # report every model, even a broken one
            entry.update(status=f"refused: {exc}")
        entry["contract"] = sm.spec.model_dump(mode="json")
        rows.append(entry)
    for key, why in broken.items():  # a manifest the server cannot even read
        rows.append({"key": key, "path": str(settings.model_store / key), "status": f"refused: {why}"})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no models in {settings.model_store}")
        return 1
    for r in rows:
        print(f"{r['key']}: {r['status']} on {r.get('provider', '-')}")
        c = r.get("contract")
        if c is None:
            continue
        print(
            f"  {c['sample_rate']} Hz, frame {c['frame_samples']}, hop {c['hop_samples']}, "
            f"context {c['context_samples']}, labels {[lab for o in c['outputs'] for lab in o['labels']]}"
        )
        states = ", ".join(f"{s['input']}{s['shape']}@{s['batch_axis']}" for s in c["states"])
        print(f"  states: {states or '-'}; sequence graph: {r.get('sequence_graph', False)}")
    return 0


#: ``lookback models check`` exit status: every check passed and the scores were verified;
#: a check failed; usage (not a directory, a reference without its clip); every check
#: passed but nothing verified the scores (no sequence graph, no reference scores).
CHECK_PASS, CHECK_FAIL, CHECK_USAGE, CHECK_UNVERIFIED = 0, 1, 2, 4


def _models_check(args: argparse.Namespace) -> int:
    """``lookback models check DIR``: the parity harness; exit 0 when every check passes and
    the scores were verified (see ``CHECK_*``)."""
    from lookback.client import read_wav
    from lookback.modelcheck import Reference, check_model_dir

    if not Path(args.name).is_dir():
        print(
            f"error: {args.name} is not a model directory (usage: lookback models check DIR)", file=sys.stderr
        )
        return CHECK_USAGE
    wavs, refs = list(args.clip or []), list(args.reference or [])
    if len(refs) > len(wavs):
        print(
            "error: each --reference SCORES.npy needs the --clip CLIP.wav it was computed on "
            "(paired in order)",
            file=sys.stderr,
        )
        return CHECK_USAGE
    clips = []
    for wav in wavs:
        samples, _rate = read_wav(wav)
        clips.append(samples.astype("float32") / 32768.0)
    references = [Reference.load(Path(w).name, c, r) for w, c, r in zip(wavs, clips, refs, strict=False)]
    report = check_model_dir(
        Path(args.name), clips, references=references, allow_unverified=args.allow_unverified, tol=args.tol
    )
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.text())
    if not report.passed:
        return CHECK_FAIL
    return CHECK_PASS if report.ok else CHECK_UNVERIFIED


def _models_convert(args: argparse.Namespace) -> int:
    """``lookback models convert module.py:build weights.pt OUT_DIR``: a stock PyTorch module
    -> its streaming twin, written only if the parity harness passes (needs torch)."""
    try:
        from lookback.streaming.convert import convert_command
    except ImportError as exc:  # the server install has no torch
        print(f"error: models convert needs torch (pip install -e '.[train]'): {exc}", file=sys.stderr)
        return 2
    return convert_command(args.name, args.rest, args)


def _rate_arg(text: str | None) -> int | str | None:
    """``--sample-rate``: None, ``native`` (the file's own rate) or a number of Hz."""
    return text if text in (None, "native") else int(text)


def _sample_rate(text: str) -> str:
    if text != "native" and not text.isdigit():
        raise argparse.ArgumentTypeError("a rate in Hz (e.g. 48000) or native")
    return text


def cmd_stream(args: argparse.Namespace) -> int:
    from lookback.client import LookbackClient, file_messages

    audio = file_messages(
        args.file,
        encoding=args.encoding,
        sample_rate=_rate_arg(args.sample_rate),
        frames_per_message=args.frames_per_message,
        message_ms=args.message_ms,
    )
    client = LookbackClient(args.url, api_key=args.api_key)
    total = audio.duration

    async def run() -> int:
        async for msg in client.stream(
            audio.messages,
            model=args.model,
            encoding=args.encoding,
            sample_rate=audio.sample_rate,
            realtime=args.realtime,
            results="all" if args.all else "events",
        ):
            kind = msg.get("type")
            if kind == "result":
                _progress(msg["time"], total, "streaming")
                if args.all:
                    print(json.dumps(msg))
            elif kind == "event":
                print(f"{msg['time']:8.3f}s  {msg['label']} {msg['event']}")
            elif kind == "error":
                print(f"error {msg['code']}: {msg['message']}", file=sys.stderr)
            elif kind == "summary":
                _progress(total, total, "streaming")
                print(
                    f"summary: {msg['frames']} frames, {msg['steps']} steps, {len(msg['events'])} events"
                    + (f", {client.resumes} resumes" if client.resumes else "")
                )
        return 0

    return asyncio.run(run())


def cmd_score(args: argparse.Namespace) -> int:
    from lookback.client import LookbackClient

    client = LookbackClient(args.url, api_key=args.api_key, timeout=3600)
    size = Path(args.file).stat().st_size
    if size > 8 << 20:
        print(f"uploading {size / 1e6:.0f} MB ...", file=sys.stderr)
    result = asyncio.run(client.score(args.file, model=args.model, sample_rate=_rate_arg(args.sample_rate)))
    if args.json:
        print(json.dumps(result))
        return 0
    for ev in result["events"]:
        print(f"{ev['time']:8.3f}s  {ev['label']} {ev['event']}")
    print(f"{result['steps']} steps, {len(result['events'])} events ({result['model']}/{result['version']})")
    return 0


def cmd_loadtest(args: argparse.Namespace) -> int:
    from lookback.loadtest.cli import main_args

    return main_args(args)


def cmd_protocol(args: argparse.Namespace) -> int:
    from lookback.protocol import markdown_tables

    print(markdown_tables())
    return 0


def cmd_docs(args: argparse.Namespace) -> int:
    from lookback.reference import PAGES, stale_pages

    stale = stale_pages(args.root, write=args.write)
    for rel in stale:
        print(f"{'rewrote' if args.write else 'out of date'}: {rel}", file=sys.stderr)
    if not stale:
        print(f"up to date: {', '.join(PAGES)}", file=sys.stderr)
    return 1 if stale and not args.write else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lookback", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the server (settings from LOOKBACK_* env too)")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--model-store", type=Path)
    s.add_argument("--default-model")
    s.add_argument("--workers", help="worker processes on one port: a number, or auto (one per usable CPU)")
    s.set_defaults(func=cmd_serve)

    co = sub.add_parser(
        "consume",
        help="score audio from broker sources (docs/sources.md); /metrics, /healthz, /readyz "
        "on LOOKBACK_CONSUME_METRICS_PORT",
    )
    co.add_argument(
        "url",
        nargs="*",
        help="redis://...?stream=..., mqtt://...?prefix=... or kafka://HOSTS/TOPIC?group=...",
    )
    co.set_defaults(func=cmd_consume)

    m = sub.add_parser(
        "models", help="list the store's models with their contract, import one, or check a model directory"
    )
    m.add_argument("action", nargs="?", choices=["list", "import", "check", "convert"], default="list")
    m.add_argument(
        "name",
        nargs="?",
        default="silero-vad",
        help="import: model name; check: model directory; convert: module.py:build (a function or class)",
    )
    m.add_argument("rest", nargs="*", help="convert: WEIGHTS.pt (or -) OUT_DIR")
    m.add_argument("--hop", type=int, help="convert: the hop in samples the module must have")
    m.add_argument("--labels", help="convert: comma-separated names of the score columns")
    m.add_argument("--model-name", help="convert: the model's name (default: OUT_DIR's parent folder)")
    m.add_argument("--clip", action="append", type=Path, help="check: a real clip (WAV) to check on too")
    m.add_argument(
        "--reference",
        action="append",
        type=Path,
        help="check: the original model's scores on the matching --clip (.npy [N, labels]; .npz per "
        "output), the reference that certifies a model without a sequence graph",
    )
    m.add_argument(
        "--allow-unverified",
        action="store_true",
        help="check: exit 0 although nothing verified the scores (no sequence graph, no --reference)",
    )
    m.add_argument("--tol", type=float, default=1e-5, help="check: tolerance on the outputs (default 1e-5)")
    m.add_argument("--model-store", type=Path)
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_models)

    for name, func, helptext in (
        ("stream", cmd_stream, "stream a file over the WebSocket"),
        ("score", cmd_score, "score a file with POST /v1/score"),
    ):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("file", type=Path)
        c.add_argument("--url", default="http://127.0.0.1:8000")
        c.add_argument("--model")
        c.add_argument("--api-key")
        c.add_argument(
            "--sample-rate",
            type=_sample_rate,
            help="send the file at its own rate, which the server resamples: native, or that rate "
            "in Hz (the client never resamples; without this the file must be 16 kHz)",
        )
        if name == "stream":
            c.add_argument("--realtime", action="store_true", help="pace frames at real time")
            c.add_argument("--all", action="store_true", help="print every score too")
            c.add_argument(
                "--encoding",
                choices=["pcm_s16le", "pcm_f32le", "mulaw", "alaw"],
                default="pcm_s16le",
                help="wire encoding (mulaw/alaw: G.711, as a phone line carries it)",
            )
            c.add_argument(
                "--frames-per-message",
                type=int,
                default=1,
                help="128-sample frames a message (PCM at 16 kHz)",
            )
            c.add_argument(
                "--message-ms",
                type=int,
                default=20,
                help="milliseconds a message in any other form (G.711, another rate; default 20)",
            )
        else:
            c.add_argument("--json", action="store_true")
        c.set_defaults(func=func)

    lt = sub.add_parser(
        "loadtest",
        help="N real-time WebSocket sessions: latency percentiles, "
        "or --ramp to find how many stay under a p99 bound",
    )
    from lookback.loadtest.cli import add_arguments

    add_arguments(lt)
    lt.set_defaults(func=cmd_loadtest)

    pr = sub.add_parser("protocol", help="print the error and close code tables")
    pr.set_defaults(func=cmd_protocol)

    d = sub.add_parser("docs", help="check (or --write) the generated tables of docs/ in a checkout")
    d.add_argument("--write", action="store_true", help="rewrite the out-of-date tables")
    d.add_argument("--root", type=Path, default=Path.cwd(), help="the checkout (default: here)")
    d.set_defaults(func=cmd_docs)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        import httpx

        from lookback.client import LookbackClientError
        from lookback.errors import LookbackError

        if isinstance(exc, LookbackError | LookbackClientError):  # server refusals too
            print(f"error [{exc.code}]: {exc.message}", file=sys.stderr)
            return 2
        if isinstance(exc, OSError | httpx.HTTPError):  # server down or unreachable
            print(f"error [unreachable]: {exc}", file=sys.stderr)
            return 3
        raise


if __name__ == "__main__":
    sys.exit(main())

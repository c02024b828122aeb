"""Old code against new, side by side in one run: the data plane's figures (issue 25).

The old code is a git worktree of ``--old`` (default: the commit the data-plane work started
from), served by the same interpreter with its own ``service/`` first on the path. Every
figure is a pair measured back to back on the same machine (server pinned to CPU 0, load
generator to CPU 1), because this VM moves 30% from minute to minute:

- ``fpm1``, ``fpm4``, ``fpm10``, ``fpm10_batch`` (default model), ``silero1``, ``silero4``:
  the ramp's real-time sessions at p99 <= 20 ms, nothing lost, old then new; the load
  generator's CPU at each max (on 2 cores the client can become the limit);
- ``fpm1_binary``: the new server with ``result_format=binary`` against JSON;
- ``cpu150``: server CPU per result at a fixed 150 real-time sessions, old and new, in
  ``--pairs`` alternating pairs (the median of the per-pair ratios);
- ``cpu150_fill``: the same with both trees set to fill batches (``FILL``: every small
  batch may wait 4 ms), the setting for a server that must spend least CPU per stream;
- ``indep``: at each tree's 1-frame max and 15% above it, the project's load generator
  and an independent one (``indep_load``: picows' client, no Lookback code) side by side;
- ``points``: at 50% / 90% / 100% of the new max (1 frame/msg): p50/p99, rows per batch
  (``lookback_batch_size``), the model's share of the server's CPU
  (``lookback_model_cpu_share``) and the server's CPU, for old and new at the same loads.

    python -m tests.bench.ab_bench [--old REV] [--quick] [--only fpm1,cpu150,...]

Writes ``tests/bench/results/<date>-<host>-ab[-<steps>].{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from lookback.loadtest.config import LoadConfig
from lookback.loadtest.fanout import run_load
from lookback.loadtest.ramp import ramp
from lookback.loadtest.report import format_ramp
from tests.bench.run_all import (
    FIXTURE,
    REPO,
    RESULTS,
    Server,
    cpus,
    log,
    lookback_server,
    proc_cpu_seconds,
    report_paths,
)
from tests.support import free_port

BASE_REV = "0189e1e"  # the commit issue 25 (the data plane) started from
STEPS = (
    "echo",
    "cpu150",
    "cpu150_fill",
    "fpm1",
    "points",
    "indep",
    "fpm4",
    "fpm10",
    "fpm10_batch",
    "fpm1_binary",
    "silero1",
    "silero4",
)
ECHOES = ("old_asgi", "new_asgi", "new_direct", "picows")
FLOORS = ("new_direct", "picows")  # cpu150: the echo's CPU per message at the same load
# cpu150_fill: every small batch may wait up to 4 ms to fill (old and new alike), instead of
# the new default's wait that grows with CPU use: less CPU per result for ~2 ms of latency
FILL = {"max_wait_ms": 4, "adaptive_wait": "false"}
SILERO = "silero-vad"
DEFAULT = "lookback-vad"
REALTIME_MSGS_PER_S = 16000 / 128  # one 128-sample frame per message, real time


def old_tree(rev: str) -> Path:
    """A worktree of ``rev`` in the temp folder (made once; outside the repo, where no test
    collector or type checker walks), Silero linked into its store."""
    path = Path(tempfile.gettempdir()) / f"lookback-ab-{rev}"
    if not (path / "service").is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), rev], check=True)
    silero, link = REPO / "model_store" / SILERO, path / "model_store" / SILERO
    if silero.is_dir() and not link.exists():
        link.symlink_to(silero, target_is_directory=True)
    return path


def server(tree: Path | None, model: str, cpu: int | None, **env: Any) -> Server:
    """``lookback serve`` of this tree (None) or of an old worktree."""
    srv = lookback_server(model, free_port(), cpu, **env)
    srv.argv = [sys.executable, "-m", "lookback.cli", "serve"]
    if tree is not None:
        srv.env["PYTHONPATH"] = str(tree / "service")
    srv.name = f"{'old' if tree else 'new'}-{model}"
    return srv


_SCRAPED = frozenset(
    {
        "lookback_batch_size_sum",
        "lookback_batch_size_count",
        "lookback_model_cpu_share",
        "lookback_process_busy_ratio",
    }
)


def scrape(port: int, model_key: str) -> dict[str, float]:
    """Batch-size histogram sum/count and the new gauges, for one model."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.labels.get("model") != model_key:
                continue
            if s.name in _SCRAPED:
                out[s.name] = s.value
    return out


class AB:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.old = old_tree(args.old)
        cs = cpus()
        self.server_cpu = cs[0] if len(cs) >= 2 else None
        self.client_cpus = cs[1:] if len(cs) >= 2 else None
        self.quick = args.quick
        self.results: dict[str, Any] = {"old_rev": args.old}

    def cfg(self, url: str, model: str, fpm: int, **kw: Any) -> LoadConfig:
        """A run's settings; Lookback's runs check 4 sessions' scores against REST (an
        echo server passes ``verify=0``: it has no REST endpoint)."""
        kw.setdefault("verify", 4)
        return LoadConfig(
            urls=[url],
            warmup=0.5 if self.quick else 2.0,
            duration=1.5 if self.quick else 6.0,
            wav=str(FIXTURE),
            frames_per_message=fpm,
            p99_ms=20.0,
            cpus=self.client_cpus,
            end_timeout=6.0,
            quiet=False,
            model=model,
            **kw,
        )

    def ramp(self, cfg: LoadConfig, start: int) -> dict[str, Any]:
        """One ramp: the max, whether the client was the limit, its CPU there."""
        res = ramp(
            cfg,
            start=start,
            max_sessions=4000,
            max_trials=3 if self.quick else 8,
            max_time=25.0 if self.quick else 150.0,
        )
        print(format_ramp(res), file=sys.stderr, flush=True)
        best = res.get("best") or {}
        return {
            "max_sessions": res["max_sessions"],
            "client_bottleneck": res["client_bottleneck"],
            "client_cpu_at_max": (best.get("client") or {}).get("cpu_total"),
            "p99_ms_at_max": (best.get("latency_ms") or {}).get("p99"),
            "verify_max_abs_diff": (best.get("verify") or {}).get("max_abs_diff"),
            "trials": res["trials"],
        }

    def ramp_pair(self, model: str, fpm: int, **kw: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        trees: list[tuple[str, Path | None]] = [("old", self.old), ("new", None)]
        for name, tree in trees:
            if name == "old" and kw.get("result_format", "json") != "json":
                continue
            with server(tree, model, self.server_cpu) as srv:
                start = max(8, int(out.get("old", {}).get("max_sessions", 64) * 0.75))
                out[name] = self.ramp(self.cfg(srv.url, model, fpm, **kw), start)
        if "old" in out and out["old"]["max_sessions"]:
            out["ratio"] = out["new"]["max_sessions"] / out["old"]["max_sessions"]
        log(
            f"{model} fpm {fpm} {kw}: "
            + ", ".join(f"{k} {v['max_sessions']}" for k, v in out.items() if k != "ratio")
        )
        return out

    def fixed(self, tree: Path | None, model: str, n: int, fpm: int = 1, **env: Any) -> dict[str, Any]:
        """A fixed load of ``n`` sessions on ``lookback serve`` (see ``fixed_on``)."""
        with server(tree, model, self.server_cpu, **env) as srv:
            key = f"{model}/1" if model == DEFAULT else f"{model}/6.2.3"
            return self.fixed_on(srv, model, n, fpm, key)

    def fixed_on(self, srv: Server, model: str, n: int, fpm: int, key: str | None) -> dict[str, Any]:
        """A fixed load of ``n`` sessions: the server's CPU over the middle of the window,
        rows per batch and the model's CPU share over it (``key``: the model's metrics;
        None for an echo server, whose messages per second are the client's), latency."""
        cfg = replace(self.cfg(srv.url, model, fpm, verify=4 if key else 0), sessions=n)
        window: dict[str, Any] = {}
        done = threading.Event()

        def sample() -> None:
            deadline = time.monotonic() + 120
            while key is not None and not done.is_set() and time.monotonic() < deadline:
                try:
                    if int(httpx.get(f"{srv.url.replace('ws', 'http')}/readyz").json()["sessions"]) >= n:
                        break
                except (httpx.HTTPError, ValueError, KeyError):
                    pass
                done.wait(0.05)
            if done.wait((0.2 if key else 0.5) + cfg.warmup):  # an echo has no /readyz count
                return
            m0 = scrape(srv.port, key) if key else {}
            c0, w0 = proc_cpu_seconds(srv.pid), time.monotonic()
            if done.wait(0.8 * cfg.duration):
                return
            m1 = scrape(srv.port, key) if key else {}
            c1, w1 = proc_cpu_seconds(srv.pid), time.monotonic()
            batches = m1.get("lookback_batch_size_count", 0) - m0.get("lookback_batch_size_count", 0)
            rows = m1.get("lookback_batch_size_sum", 0) - m0.get("lookback_batch_size_sum", 0)
            window.update(
                cpu_share=(c1 - c0) / (w1 - w0),
                rows_per_batch=rows / batches if batches else None,
                model_cpu_share=m1.get("lookback_model_cpu_share"),
                # an echo replies once per frame, as many as the sessions send in real time
                results_per_s=rows / (w1 - w0) if key else n * REALTIME_MSGS_PER_S,
            )

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        try:
            res = run_load(cfg)
        finally:
            done.set()
            th.join()
        lat = res.get("latency_ms") or {}
        out = {
            "sessions": n,
            "passed": bool(res.get("passed")),
            "p50_ms": lat.get("p50"),
            "p99_ms": lat.get("p99"),
            "lost": res.get("lost_results"),
            "client_cpu": (res.get("client") or {}).get("cpu_total"),
            "verify_max_abs_diff": (res.get("verify") or {}).get("max_abs_diff"),
            **window,
        }
        if window.get("results_per_s"):
            out["server_us_per_result"] = window["cpu_share"] / window["results_per_s"] * 1e6
        return out

    # -- steps -------------------------------------------------------------------------------
    def echo_server(self, kind: str) -> Server:
        """The echo ceiling's server on one transport (see ``ECHOES``)."""
        port = free_port()
        env = {"LOOKBACK_HOST": "127.0.0.1", "LOOKBACK_LOG_LEVEL": "warning", "LOOKBACK_MAX_SESSIONS": "4200"}
        py = sys.executable
        if kind == "old_asgi":  # the old tree's own echo server and lookback
            env["PYTHONPATH"] = f"{self.old / 'service'}{os.pathsep}{self.old}"
            argv = [py, "-m", "tests.bench.echo_server", "--port", str(port)]
            return Server("echo-old", argv, env, port, self.server_cpu, cwd=self.old)
        if kind == "picows":
            argv = [py, "-m", "tests.bench.echo_picows", "--port", str(port)]
            return Server("echo-picows", argv, env, port, self.server_cpu, ready_path=None)
        argv = [py, "-m", "tests.bench.echo_server", "--port", str(port)]
        if kind == "new_direct":
            argv.append("--direct")
        return Server(f"echo-{kind}", argv, env, port, self.server_cpu)

    def step_echo(self) -> dict[str, Any]:
        """The echo ceiling (no model, a reply per hop) of each transport tried."""
        out: dict[str, Any] = {}
        for kind in ECHOES:
            if kind == "picows" and importlib.util.find_spec("picows") is None:
                out[kind] = {"skipped": "picows is not installed"}
                continue
            with self.echo_server(kind) as srv:
                out[kind] = self.ramp(self.cfg(srv.url, DEFAULT, 1, verify=0), 128)
            log(f"echo {kind}: {out[kind]['max_sessions']}")
        return out

    def step_cpu150(self) -> dict[str, Any]:
        """Old and new alternating, ``--pairs`` times: one window moves by 20-30% here, so
        the figure is the median of the per-pair ratios (each pair back to back)."""
        return self._cpu_pairs(floors=True)

    def step_cpu150_fill(self) -> dict[str, Any]:
        """``cpu150`` with both trees told to fill batches (``FILL``): the CPU-first setting."""
        return self._cpu_pairs(floors=False, **FILL)

    def _cpu_pairs(self, *, floors: bool, **env: Any) -> dict[str, Any]:
        n = 40 if self.quick else 150
        pairs = []
        for _ in range(self.args.pairs):
            pair = {"old": self.fixed(self.old, DEFAULT, n, **env)}
            pair["new"] = self.fixed(None, DEFAULT, n, **env)
            for kind in FLOORS if floors else ():  # the transport alone at the same load: the floor
                if kind == "picows" and importlib.util.find_spec("picows") is None:
                    continue
                with self.echo_server(kind) as srv:
                    pair[f"echo_{kind}"] = self.fixed_on(srv, DEFAULT, n, 1, None)
            pairs.append(pair)
        ratios = [
            p["new"]["server_us_per_result"] / p["old"]["server_us_per_result"]
            for p in pairs
            if p["new"].get("server_us_per_result") and p["old"].get("server_us_per_result")
        ]
        out: dict[str, Any] = {"old": pairs[0]["old"], "new": pairs[0]["new"], "pairs": pairs}
        if ratios:
            out["ratio_new_over_old"] = statistics.median(ratios)
            out["ratios"] = ratios
        log(f"cpu at {n} sessions {env}, new / old per pair: {[round(r, 2) for r in ratios]}")
        return out

    def step_fpm1(self) -> dict[str, Any]:
        return self.ramp_pair(DEFAULT, 1)

    def step_points(self) -> dict[str, Any]:
        top = (self.results.get("fpm1") or {}).get("new", {}).get("max_sessions") or 400
        out: dict[str, Any] = {}
        for frac in (0.5, 0.9, 1.0):
            n = max(4, int(top * frac))
            out[f"{frac:g}"] = {
                "sessions": n,
                "old": self.fixed(self.old, DEFAULT, n),
                "new": self.fixed(None, DEFAULT, n),
            }
        return out

    def indep(self, srv: Server, n: int) -> dict[str, Any]:
        """``n`` real-time sessions from the independent load generator (``indep_load``)."""
        cfg = self.cfg(srv.url, DEFAULT, 1)
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            argv = [sys.executable, "-m", "tests.bench.indep_load", "--url", srv.url, "--sessions", str(n)]
            argv += ["--seconds", str(cfg.duration), "--warmup", str(cfg.warmup), "--wav", str(FIXTURE)]
            argv += ["--json", out.name]
            if self.client_cpus:
                argv += ["--cpu", str(self.client_cpus[0])]
            subprocess.run(argv, cwd=REPO, check=False, capture_output=True, timeout=180)
            text = Path(out.name).read_text()
        return json.loads(text) if text else {"passed": False, "error": "no result"}

    def step_indep(self) -> dict[str, Any]:
        """Both load generators at each tree's max from the ``fpm1`` ramp and 15% above it:
        they agree when both pass at the max (and both fail above, or both pass)."""
        out: dict[str, Any] = {}
        for name, tree in (("old", self.old), ("new", None)):
            top = ((self.results.get("fpm1") or {}).get(name) or {}).get("max_sessions") or 150
            for frac in (1.0, 1.15):
                n = max(4, int(top * frac))
                with server(tree, DEFAULT, self.server_cpu) as srv:
                    own = self.fixed_on(srv, DEFAULT, n, 1, None)
                with server(tree, DEFAULT, self.server_cpu) as srv:
                    ind = self.indep(srv, n)
                out[f"{name} {frac:g}"] = {"sessions": n, "own": own, "indep": ind}
                log(
                    f"indep {name} x{frac:g} ({n}): own {own['passed']} p99 {_f(own.get('p99_ms'), '.1f')}, "
                    f"indep {ind.get('passed')} p99 {_f(ind.get('p99_ms'), '.1f')}"
                )
        return out

    def step_fpm4(self) -> dict[str, Any]:
        return self.ramp_pair(DEFAULT, 4)

    def step_fpm10(self) -> dict[str, Any]:
        return self.ramp_pair(DEFAULT, 10)

    def step_fpm10_batch(self) -> dict[str, Any]:
        return self.ramp_pair(DEFAULT, 10, results="batch")

    def step_fpm1_binary(self) -> dict[str, Any]:
        out = self.ramp_pair(DEFAULT, 1, result_format="binary")
        json_max = (self.results.get("fpm1") or {}).get("new", {}).get("max_sessions")
        if json_max:
            out["ratio_binary_over_json"] = out["new"]["max_sessions"] / json_max
        return out

    def step_silero1(self) -> dict[str, Any]:
        return self.ramp_pair(SILERO, 1)

    def step_silero4(self) -> dict[str, Any]:
        return self.ramp_pair(SILERO, 4)

    def run(self, steps: list[str]) -> dict[str, Any]:
        for name in steps:
            log(f"--- {name} ---")
            t = time.monotonic()
            try:
                self.results[name] = getattr(self, f"step_{name}")()
            except Exception as exc:  # one failed step must not lose the others
                log(f"{name} FAILED: {type(exc).__name__}: {exc}")
                self.results[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            self.results[name]["step_s"] = time.monotonic() - t
        return self.results


def _row(*cells: Any) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def to_markdown(res: dict[str, Any]) -> str:
    lines = [f"# Data plane, old ({res['old_rev']}) against new, one run", ""]
    echo = res.get("echo") or {}
    if echo:
        lines += [
            _row("echo ceiling (1 frame/msg)", "sessions", "client CPU at max"),
            _row("---", "---", "---"),
        ]
        for kind in ECHOES:
            e = echo.get(kind) or {}
            bound = " (client-bound)" if e.get("client_bottleneck") else ""
            top = e.get("max_sessions", e.get("skipped", "–"))
            lines.append(_row(kind, f"{top}{bound}", _f(e.get("client_cpu_at_max"))))
        lines.append("")
    lines += [
        _row("step", "old max", "new max", "new / old", "client CPU at new max"),
        _row("---", "---", "---", "---", "---"),
    ]
    for name in STEPS:
        r = res.get(name) or {}
        new = r.get("new") or {}
        if "max_sessions" not in new:
            continue
        bound = " (client-bound)" if new.get("client_bottleneck") else ""
        ratio = r.get("ratio") or r.get("ratio_binary_over_json")
        old = (r.get("old") or {}).get("max_sessions", "")
        lines.append(
            _row(name, old, f"{new['max_sessions']}{bound}", _f(ratio), _f(new.get("client_cpu_at_max")))
        )
    c = res.get("cpu150") or {}
    if "new" in c or "new" in (res.get("cpu150_fill") or {}):
        head = ("fixed load", "sessions", "server CPU (cores)", "µs per result", "rows per batch")
        lines += ["", _row(*head, "model CPU share", "p50 / p99 ms"), _row(*["---"] * 7)]
        rows = []
        for i, pair in enumerate(c.get("pairs") or ([c] if "new" in c else [])):
            rows += [(f"cpu150 old #{i + 1}", pair["old"]), (f"cpu150 new #{i + 1}", pair["new"])]
            rows += [(f"cpu150 echo {k} #{i + 1}", pair[f"echo_{k}"]) for k in FLOORS if f"echo_{k}" in pair]
        for i, pair in enumerate((res.get("cpu150_fill") or {}).get("pairs") or []):
            rows += [(f"cpu150_fill old #{i + 1}", pair["old"]), (f"cpu150_fill new #{i + 1}", pair["new"])]
        for frac, p in (res.get("points") or {}).items():
            if isinstance(p, dict) and "new" in p:
                rows += [(f"{frac} of new max, old", p["old"]), (f"{frac} of new max, new", p["new"])]
        for label, r in rows:
            lat = f"{_f(r.get('p50_ms'), '.1f')} / {_f(r.get('p99_ms'), '.1f')}"
            lines.append(
                _row(
                    label,
                    r.get("sessions"),
                    _f(r.get("cpu_share")),
                    _f(r.get("server_us_per_result"), ".1f"),
                    _f(r.get("rows_per_batch"), ".1f"),
                    _f(r.get("model_cpu_share")),
                    lat,
                )
            )
    ind = res.get("indep") or {}
    if any(isinstance(v, dict) and "own" in v for v in ind.values()):
        lines += [
            "",
            _row("both load generators", "sessions", "own: pass, p99 ms", "independent: pass, p99, scores"),
            _row(*["---"] * 4),
        ]
        for label, v in ind.items():
            if isinstance(v, dict) and "own" in v:
                o, i = v["own"], v["indep"]
                lines.append(
                    _row(
                        f"{label} x the ramp's max",
                        v["sessions"],
                        f"{o.get('passed')}, {_f(o.get('p99_ms'), '.1f')}",
                        f"{i.get('passed')}, {_f(i.get('p99_ms'), '.1f')}, "
                        f"max abs diff from REST {_f(i.get('verify_max_abs_diff'), '.1e')}",
                    )
                )
    diffs = [
        run["verify_max_abs_diff"]
        for step in res.values()
        if isinstance(step, dict)
        for pair in [step, *(step.get("pairs") or [])]
        if isinstance(pair, dict)
        for run in (pair.get("old"), pair.get("new"))
        if isinstance(run, dict) and run.get("verify_max_abs_diff") is not None
    ]
    if diffs:
        worst = f"{max(diffs):.1e}"
        lines += ["", f"Scores of 4 sessions per Lookback run against /v1/score: max abs diff {worst}"]
    for name in ("cpu150", "cpu150_fill"):
        r = res.get(name) or {}
        if r.get("ratios"):
            ratios = ", ".join(f"{x:.2f}" for x in r["ratios"])
            lines += [
                "",
                f"{name}: server CPU per result, new / old, median of pairs: "
                f"{r['ratio_new_over_old']:.2f} ({ratios})",
            ]
    return "\n".join(lines) + "\n"


def _f(v: Any, spec: str = ".2f") -> str:
    return format(v, spec) if isinstance(v, int | float) else "–"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", default=BASE_REV, help="git revision of the old code")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--pairs", type=int, default=3, help="cpu150: old/new pairs (median of the ratios)")
    p.add_argument("--only", help=f"comma-separated steps of {','.join(STEPS)}")
    args = p.parse_args(argv)
    steps = args.only.split(",") if args.only else list(STEPS)
    unknown = set(steps) - set(STEPS)
    if unknown:
        p.error(f"unknown steps: {sorted(unknown)}")
    ab = AB(args)
    res = ab.run(steps)
    res["host"] = socket.gethostname()
    res["date"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    res["cpus"] = os.cpu_count()
    RESULTS.mkdir(parents=True, exist_ok=True)
    part = f"-{args.only.replace(',', '-')}" if args.only else ""
    out_json, out_md = report_paths(RESULTS, f"{dt.date.today().isoformat()}-{socket.gethostname()}-ab{part}")
    out_json.write_text(json.dumps(res, indent=1, default=str))
    md = to_markdown(res)
    out_md.write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

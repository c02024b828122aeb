"""OrtGraph: one ONNX Runtime session for one graph, shared by every client of a model.

Provider choice is CUDA -> CPU. ``onnxruntime-gpu`` lists the CUDA provider even on a
machine without CUDA libraries and then prints a burst of ERROR lines while falling
back; we probe at FATAL severity so a CPU machine starts quietly, and log exactly one
line naming the provider that is really active.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnxruntime as ort

from lookback.errors import ContractError

log = logging.getLogger("lookback.runtime")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

_probe_lock = threading.Lock()


def provider_chain(preference: str) -> list[str]:
    """Providers to try, best first, for a settings value of auto|cpu|cuda."""
    available = ort.get_available_providers()
    if preference == "cpu" or CUDA not in available:
        return [CPU]
    return [CUDA, CPU]


class OrtGraph:
    """One ORT InferenceSession plus the bookkeeping to call it safely and cheaply."""

    def __init__(
        self,
        path: str,
        *,
        model: bytes | None = None,
        providers: str = "auto",
        intra_op_threads: int = 1,
        inter_op_threads: int = 1,
    ) -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = inter_op_threads
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Keep ORT's own per-run threads from spinning on a core shared with the event loop.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        chain = provider_chain(providers)
        with _probe_lock:
            previous = 2
            ort.set_default_logger_severity(4)
            try:
                source = path if model is None else model
                self.session = ort.InferenceSession(source, sess_options=opts, providers=chain)
            except Exception as exc:  # ORT raises its own types; normalise to our base
                raise ContractError(f"{path}: ONNX Runtime cannot load the graph: {exc}") from exc
            finally:
                ort.set_default_logger_severity(previous)
        active = self.session.get_providers()
        self.provider = active[0] if active else CPU
        if providers == "cuda" and self.provider != CUDA:
            log.warning("CUDA requested but unavailable; running %s on CPU", path)
        self.inputs = self.session.get_inputs()
        self.outputs = self.session.get_outputs()
        self.output_names = [o.name for o in self.outputs]
        self._use_binding = self.provider == CUDA

    @property
    def on_gpu(self) -> bool:
        return self.provider == CUDA

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run the graph; on CUDA through IOBinding so ORT copies each input once."""
        if not self._use_binding:
            return self.session.run(self.output_names, dict(feeds))
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()


def run_warmup(
    rt: OrtGraph, make_feeds: Callable[[int], dict[str, np.ndarray]], batch_sizes: Sequence[int]
) -> None:
    """Run each expected batch size once so the first client never pays allocation costs."""
    for b in batch_sizes:
        rt.run(make_feeds(b))

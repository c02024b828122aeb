"""One error base for Lookback.

Domain errors carry a stable machine-readable ``code`` (listed in ``lookback.protocol``)
and never an HTTP status or a WebSocket close code: the API layer maps codes to those,
so the engine stays transport-free.
"""

from __future__ import annotations


class LookbackError(Exception):
    """Base of every error Lookback raises on purpose."""

    code: str = "internal_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class ContractError(LookbackError):
    """A model manifest, or the ONNX graph it describes, is not usable."""

    code = "model_contract"


class ModelNotFound(LookbackError):
    code = "unknown_model"


class BadAudio(LookbackError):
    """Client audio that cannot be accepted (size, encoding, non-finite samples)."""

    code = "bad_audio"


class CapacityError(LookbackError):
    """No room for another session or request; retry later."""

    code = "server_busy"


class SessionClosed(LookbackError):
    code = "session_closed"


class BackpressureError(LookbackError):
    """A client sent audio faster than its results can be computed."""

    code = "too_many_pending_steps"


class NonFiniteState(LookbackError):
    """A model step produced NaN or Inf; the guard reset that session's state (engine/guard.py)."""

    code = "non_finite_state"


class InferenceError(LookbackError):
    """The model call failed for a whole batch; every waiter of that batch gets this."""

    code = "inference_failed"


class RequestError(LookbackError):
    """A request-level refusal (REST body, upload); its HTTP status comes from protocol.py."""


class SnapshotError(LookbackError):
    """A session snapshot that cannot be restored here: damaged, another format, another model."""

    code = "snapshot_invalid"

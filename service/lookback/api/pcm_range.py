"""Kept for imports: the float range rule lives in ``lookback.engine.pcm`` (every ingestion path)."""

from lookback.engine.pcm import float_problem

__all__ = ["float_problem"]

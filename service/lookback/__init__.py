"""Lookback: a real-time inference server for streaming audio models."""

__version__ = "0.1.0"

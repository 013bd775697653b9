"""Exceptions. Each message says what is wrong and what to do (the flag to change)."""


class StreamPruneError(Exception):
    """Base class: the CLI prints these as one line and exits non-zero."""


class CheckpointError(StreamPruneError):
    """The source checkpoint is missing, garbled, a pickle, or inconsistent."""


class UnsupportedArchitectureError(StreamPruneError):
    """The model's architecture has no adapter."""


class RatioError(StreamPruneError):
    """The requested ratio is out of range or unreachable for the method."""


class CalibrationError(StreamPruneError):
    """Calibration or evaluation data is missing, empty or too short."""


class ConfigError(StreamPruneError):
    """A bad option value (nsamples, seqlen, device, dtype, ...)."""


class OutputError(StreamPruneError):
    """The output folder cannot be written safely."""


class NumericalError(StreamPruneError):
    """NaN/Inf in statistics or a failed factorisation."""

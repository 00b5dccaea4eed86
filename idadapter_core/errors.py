"""The few exception types the pack raises; every message says what was wrong and what to do."""


class IDAdapterError(Exception):
    """Base class of every error this pack raises on purpose."""


class WeightsFormatError(IDAdapterError):
    """The file is not an adapter weights file we can read (not safetensors, truncated, wrong format)."""


class IncompatibleWeightsError(IDAdapterError):
    """The weights were trained for another base model or another configuration."""


class NoFaceError(IDAdapterError):
    """No usable face in any of the reference images."""


class FaceModelMissingError(IDAdapterError):
    """The insightface model folder is missing, incomplete or unreadable."""


class ImageFormatError(IDAdapterError):
    """An image array that cannot be turned into RGB."""

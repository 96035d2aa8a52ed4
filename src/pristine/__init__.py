"""pristine: teach a text-to-image model new concepts without polluting it."""

__version__ = "0.1.0"

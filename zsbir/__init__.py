"""zsbir: a config-driven experiment framework for zero-shot sketch-based image retrieval."""

__version__ = "0.1.0"

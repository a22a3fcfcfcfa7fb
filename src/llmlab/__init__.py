"""llmlab: a small chat model built from scratch as a reproducible pipeline."""

__version__ = "0.1.0"

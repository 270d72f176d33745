"""rega-engine: a fast training engine for REGA multi-domain adaptation of LLMs."""

__version__ = "0.1.0"

"""NOTICE: causal activation patching of vision-language models with semantic corruptions."""

__version__ = "0.1.0"

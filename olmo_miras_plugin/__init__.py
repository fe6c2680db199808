"""olmo-miras: Titans/MIRAS neural long-term memory for OLMo-core models."""

__version__ = "0.1.0"

"""inference-gateway: an OpenAI-compatible reverse proxy that meters every call inline."""

__version__ = "0.1.0"

__all__ = ["__version__"]

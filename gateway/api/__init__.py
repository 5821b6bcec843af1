"""HTTP handlers of the data plane (OpenAI-compatible) and of operations."""

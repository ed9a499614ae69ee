"""The OpenAI-compatible HTTP server (``aphrodite run``)."""

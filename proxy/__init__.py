"""mornGPT proxy: a lean, OpenAI-compatible streaming inference proxy."""

__version__ = "0.1.0"

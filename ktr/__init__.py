"""ktr: Video-KTR (key-token attribution) reinforcement learning for video LLMs."""

__version__ = "0.1.0"

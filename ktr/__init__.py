"""ktr: Video-KTR (key-token attribution) reinforcement learning for video LLMs."""

from ktr import _moved

__version__ = "0.1.0"

_moved.install()  # old import paths of moved modules (ktr._moved)

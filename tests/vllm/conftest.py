"""vLLM tests: run on vLLM's CPU engine in `.ci/run_vllm`'s environment (`.ci/venv-vllm`); skipped elsewhere.

One engine per test module (it takes about a minute to start and ~4 GiB); never two at once.
"""

import gc
import os

import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
SKIP_REASON = "vLLM is not installed: the vLLM tests run in .ci/run_vllm's environment (.ci/venv-vllm)"


def tiny_vllm_policy_config():
    """The tiny Qwen2.5-VL with one 64-wide head (vLLM's CPU attention has no kernel for 16-wide heads) and its own
    output projection (with tied embeddings the random model's greedy tokens repeat the last input token)."""
    from ktr.config import PolicyConfig, TinyModelConfig

    return PolicyConfig(attn_implementation="eager",
                        tiny=TinyModelConfig(num_heads=1, num_kv_heads=1, tie_word_embeddings=False))


def release_engine(backend) -> None:
    """Drop the engine so that the next module's can start (one at a time on 2 cores)."""
    backend.engine = backend.sleeper = None
    gc.collect()
    torch.set_num_threads(1)

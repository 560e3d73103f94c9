"""Rollout backends are looked up by name; a dotted entry is imported only when chosen."""

import pytest

from ktr.config import SamplingConfig
from ktr.rollout.base import ROLLOUT_BACKENDS, rollout_backend
from ktr.rollout.hf import HFBackend


def test_unknown_backend_names_the_registered_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown rollout backend 'nope'.*'hf'"):
        rollout_backend("nope")


def test_dotted_entry_is_imported_on_first_use(monkeypatch) -> None:
    monkeypatch.setitem(ROLLOUT_BACKENDS, "lazy", "ktr.rollout.hf:HFBackend")
    assert type(rollout_backend("lazy")) is HFBackend
    assert type(rollout_backend("hf")) is HFBackend


def test_shared_prefix_is_the_default() -> None:
    from ktr.rollout.shared import SharedPrefixBackend

    assert type(rollout_backend(SamplingConfig().backend)) is SharedPrefixBackend


def test_hf_generate_ignores_the_checkpoints_generation_config(tiny_policy, tmp_path) -> None:
    """A checkpoint's generation_config.json (Qwen2.5-VL-Instruct's sets repetition_penalty 1.05, top_k 1, ...)
    reaches no rollout or evaluation: `load_policy` keeps only its special-token ids, as the released trainer's
    fresh GenerationConfig did. Greedy decoding (the evaluation's) gives the same tokens from a checkpoint with and
    without those settings. (Sampling from the tiny random model's flat distribution drew the same tokens even with
    the checkpoint's penalties applied, so only greedy decoding tells them apart.)"""
    import json

    import torch

    from ktr.config import PolicyConfig
    from ktr.model.policy import load_policy
    from ktr.model.saving import export_policy
    from ktr.rollout.hf import generate
    from tests.helpers import synthetic_samples

    clean_dir, polluted_dir = (export_policy(tiny_policy, tmp_path / name) for name in ("clean", "polluted"))
    settings = polluted_dir / "generation_config.json"
    settings.write_text(json.dumps({**json.loads(settings.read_text()), "repetition_penalty": 50.0, "top_k": 1,
                                    "no_repeat_ngram_size": 1, "temperature": 0.1, "top_p": 0.001,
                                    "min_new_tokens": 8, "do_sample": True}))
    processor = tiny_policy.processor
    batch = processor.collate(synthetic_samples(processor, 2))
    cfg = SamplingConfig(group_size=2, max_new_tokens=8, top_p=0.95, temperature=1.0)

    def tokens(folder):
        policy = load_policy(PolicyConfig(name_or_path=str(folder)))
        assert policy.model.generation_config.eos_token_id == tiny_policy.model.generation_config.eos_token_id
        torch.manual_seed(0)
        return generate(policy.model, policy.processor, batch, cfg, group_size=1, greedy=True).completion_ids

    assert torch.equal(tokens(polluted_dir), tokens(clean_dir))

"""Split attention (`ktr.model.attention`, the packed row's default with SDPA) under FSDP2 and gradient checkpointing:
two gloo processes, each scoring its prompt's group in one packed row, match one process training both prompts in
the naive layout (`tests/_fsdp_worker.py`, scenario `full_sdpa`; the eager scenarios cover the dense mask)."""

import pytest

from tests.test_distributed import _matches_one_process, _run_worker, _single


@pytest.mark.parametrize("scenario", ["full_sdpa", "full_sdpa_micro"])
@pytest.mark.slow
def test_fsdp2_split_attention_ranks_match_one_process_naive(tmp_path, scenario):
    """`full_sdpa_micro`: micro-batches of one completion, each prompt's keys and values shared across them."""
    fsdp = _run_worker(tmp_path, scenario)
    _matches_one_process(fsdp, _single(scenario))
    assert fsdp["losses"][1][0] > 1e-6  # step 2 has a KL term against the sharded reference

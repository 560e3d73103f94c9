"""Two-process FSDP2 check of the shared-prefix rollout's synchronised stop (gloo, CPU); run by test_distributed.py.

    python tests/_fsdp_rollout_worker.py INIT_METHOD

Both ranks shard the same tiny policy with `ktr.model.fsdp.shard_policy` and roll out greedily on a prompt of
their own (rank 0 a video, rank 1 an image). On rank 0 the first greedy token is declared an end token, so its
rows end after one step while rank 1's run to `max_new_tokens`: rank 0 must keep stepping (every decoder step is
a round of FSDP all-gathers) until rank 1 is done, or rank 1 hangs. Each rank checks its completion against an
unsharded copy of the policy decoding the same prompt alone. Prints ``OK`` on success.
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
NEW_TOKENS = 6


def check(rank: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    import ktr.rollout.shared as rs
    from ktr.config import PolicyConfig, SamplingConfig
    from ktr.model.fsdp import ensure_root_initialized, shard_policy
    from ktr.model.policy import load_policy
    from tests.helpers import synthetic_samples

    torch.manual_seed(0)
    policy = load_policy(PolicyConfig(attn_implementation="eager"))
    proc = policy.processor
    batch = proc.collate(synthetic_samples(proc, 2, image_every=2)[rank:rank + 1])  # rank 0 video, rank 1 image
    cfg = SamplingConfig(group_size=2, max_new_tokens=NEW_TOKENS, temperature=0.0)
    plain = copy.deepcopy(policy.model)
    first = rs.generate_shared(plain, proc, batch, cfg).completion_ids[0, 0].item()
    if rank == 0:  # this rank's rows end at their first token
        eos = rs.end_of_sequence_ids
        rs.end_of_sequence_ids = lambda p: sorted(set(eos(p)) | {first})
    expected = rs.generate_shared(plain, proc, batch, cfg).completion_ids  # [G, T] decoding alone, unsharded
    shard_policy(policy.model, init_device_mesh("cpu", (WORLD,)))
    ensure_root_initialized(policy.model)
    got = rs.generate_shared(policy.model, proc, batch, cfg).completion_ids
    assert got.shape == ((2, 1) if rank == 0 else (2, NEW_TOKENS)), (rank, got.shape)
    assert torch.equal(got, expected), (rank, got, expected)


def run(rank: int, init_method: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD)  # tests/helpers.py
    check(rank)
    dist.barrier()  # both ranks done before gloo is torn down
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(run, args=(sys.argv[1],), nprocs=WORLD, join=True)
    print("OK")

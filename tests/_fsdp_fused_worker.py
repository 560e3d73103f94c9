"""Two-process FSDP2 check of ``ktr.fused`` on CPU (gloo); run by ``tests/test_fused.py``.

    python tests/_fsdp_fused_worker.py INIT_METHOD

Each rank holds a tiny model whose lm_head is sharded with ``fully_shard`` (a DTensor outside forward),
computes the fused policy loss on its own data through ``call_with_head``, and checks against a plain
single-process run of the naive loss on both ranks' data: the loss, the gradient w.r.t. the hidden
states, and the full (all-gathered) gradients of the sharded head and body, which FSDP averages over ranks.
Layouts: head and root sharded (the usual one) or the head as the only FSDP module, each with and without
resharding after forward. (Calling ``head.unshard()`` and using ``head.weight`` directly instead gives
wrong head gradients in the head-only layout: nothing reduce-scatters them.) Prints ``OK`` on success.
"""

from __future__ import annotations

import copy
import itertools
import sys
from functools import partial

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from ktr.fused import call_with_head, fused_policy_loss, naive_policy_loss

WORLD = 2
N, T, H, V = 2, 5, 8, 67  # V odd: the head's rows do not split evenly across the two ranks
RTOL = 1e-5


class Tiny(nn.Module):
    """Body + lm_head; ``forward`` returns hidden states, the head is applied by the chunked loss."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(H, H)
        self.head = nn.Linear(H, V)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.body(x))  # [N, T, H]


def rank_data(rank: int) -> dict:
    g = torch.Generator().manual_seed(100 + rank)
    return dict(
        x=torch.randn(N, T, H, generator=g),
        tokens=torch.randint(0, V, (N, T), generator=g),
        mask=torch.rand(N, T, generator=g) > 0.3,
        advantages=torch.randn(N, generator=g),
        ref_logps=torch.randn(N, T, generator=g) - 3.0,
    )


def reference(model: Tiny) -> tuple[list, list, dict]:
    """Naive losses and hidden grads per rank, and the rank-mean parameter grads (FSDP's reduction)."""
    losses, hidden_grads = [], []
    model.zero_grad(set_to_none=True)
    for r in range(WORLD):
        d = rank_data(r)
        hidden = model(d["x"])
        hidden.retain_grad()
        loss, _, _ = naive_policy_loss(hidden, model.head.weight, d["tokens"], d["advantages"], d["mask"],
                                       bias=model.head.bias, ref_logps=d["ref_logps"], beta=0.04)
        (loss / WORLD).backward()
        losses.append(loss.detach())
        hidden_grads.append(hidden.grad * WORLD)
    return losses, hidden_grads, {n: p.grad.clone() for n, p in model.named_parameters()}


def close(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
    if err > RTOL:
        raise AssertionError(f"rank {dist.get_rank()}: {name} relative error {err:.2e} > {RTOL}")


def check(rank: int) -> None:
    torch.manual_seed(0)  # the same initial model on every rank
    base = Tiny()
    losses, hidden_grads, param_grads = reference(copy.deepcopy(base))
    mesh = init_device_mesh("cpu", (WORLD,))
    strategies = ("grad-in-forward", "recompute")
    for strategy, reshard, shard_root in itertools.product(strategies, (True, False), (True, False)):
        model = copy.deepcopy(base)
        fully_shard(model.head, mesh=mesh, reshard_after_forward=reshard)
        if shard_root:  # the usual layout; without it the head is the only (root) FSDP module
            fully_shard(model, mesh=mesh)
        assert isinstance(model.head.weight, DTensor), "the head weight should be sharded"
        d = rank_data(rank)
        for _ in range(2):  # a second iteration catches FSDP state left over from the first
            model.zero_grad(set_to_none=True)
            hidden = model(d["x"])
            hidden.retain_grad()
            fn = partial(fused_policy_loss, tokens=d["tokens"], advantages=d["advantages"], mask=d["mask"],
                         ref_logps=d["ref_logps"], beta=0.04, chunk_size=3, strategy=strategy)
            loss, _, _ = call_with_head(model.head, hidden, fn)
            loss.backward()
            tag = f"{strategy} reshard={reshard} shard_root={shard_root}"
            close(f"{tag} loss", loss.detach(), losses[rank])
            close(f"{tag} hidden grad", hidden.grad, hidden_grads[rank])
            for name, p in model.named_parameters():
                if shard_root or name.startswith("head."):  # an unsharded body is not averaged over ranks
                    close(f"{tag} {name} grad", p.grad.full_tensor(), param_grads[name])


def run(rank: int, init_method: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD)  # tests/helpers.py
    check(rank)
    # Both ranks finish their collectives before either tears gloo down: destroying the group while the peer
    # still talks aborts the process natively ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(run, args=(sys.argv[1],), nprocs=WORLD, join=True)
    print("OK")

"""Two-process check of `loss.normalize` on CPU (gloo); run by ``tests/test_losses.py``.

    python tests/_loss_norm_worker.py INIT_METHOD

One batch of 5 completions is split unevenly: rank 0 holds rows 0-2 padded to 7 tokens, rank 1 rows 3-4 padded
to 4 (their tokens past 4 are padding). Each rank takes `LossTerms.of` of its rows and backpropagates the chunked
loss from hidden states through a shared head (`ktr.training.update.loss_backward`, as the RL step does); the
gradients are then averaged over the ranks, as DDP and FSDP do. Under `global` the averaged gradients (of the
hidden states and of the head) and the ranks' mean loss must equal one process's on all 5 rows, for every
aggregation, with the KL term on the key tokens or on every valid token, and with soft token weights. Under `rank`
they must differ (the check can fail).
Prints ``OK`` on success.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ktr.config import LossConfig
from ktr.training.update import LossInputs, LossTerms, loss_backward

WORLD = 2
N, T, H, V = 5, 7, 6, 11
ROWS = [(slice(0, 3), 7), (slice(3, 5), 4)]  # rank -> (rows, padded length)
AGGREGATIONS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")


def batch() -> dict:
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([7, 5, 2, 4, 3])
    valid = torch.arange(T)[None] < lengths[:, None]  # [N, T]
    key = valid & (torch.rand(N, T, generator=g) < 0.5)
    key[:, 0] = True  # every row keeps a token
    return dict(hidden=torch.randn(N, T, H, generator=g), weight=torch.randn(V, H, generator=g),
                tokens=torch.randint(0, V, (N, T), generator=g), advantages=torch.randn(N, generator=g),
                ref_logps=-torch.rand(N, T, generator=g) * 3, mask=key, valid=valid,
                weights=torch.rand(N, T, generator=g) + 0.1)


def loss_and_grads(b: dict, rows: slice, length: int, cfg: LossConfig, kl_on: str, weighted: bool):
    """This rank's loss (`ktr.training.update.loss_backward`, chunked) and its gradients w.r.t. the hidden states
    `[N, T, H]` (zero off its rows) and the head."""
    head = nn.Module()
    head.lm_head = nn.Linear(H, V, bias=False)
    with torch.no_grad():
        head.lm_head.weight.copy_(b["weight"])
    hidden = b["hidden"][rows, :length].clone().requires_grad_(True)
    cut = {k: b[k][rows, :length] for k in ("tokens", "ref_logps", "mask", "valid", "weights")}
    inputs = LossInputs(cut["tokens"], cut["mask"], b["advantages"][rows], cut["ref_logps"],
                        cut["weights"] if weighted else None, cut["valid"] if kl_on == "valid" else None)
    loss = loss_backward(head, hidden, inputs, LossTerms.of(cfg, inputs), 3, lambda t: t.backward())
    full = torch.zeros(N, T, H, dtype=torch.float64)
    full[rows, :length] = hidden.grad.double()
    return loss.double(), full, head.lm_head.weight.grad.double()


def worker(rank: int, init_method: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD)  # tests/helpers.py
    try:
        b = batch()
        failures = []
        for aggregation in AGGREGATIONS:
            for kl_on in ("key", "valid"):
                for weighted in (False, True):
                    what = f"{aggregation}, kl on {kl_on}, weights {weighted}"
                    got = {}
                    for normalize in ("global", "rank"):
                        cfg = LossConfig(beta=0.04, aggregation=aggregation, kl_on=kl_on, normalize=normalize)
                        loss, g_hidden, g_head = loss_and_grads(b, *ROWS[rank], cfg, kl_on, weighted)
                        for t in (loss, g_hidden, g_head):  # DDP/FSDP average the gradients; the loss adds up
                            dist.all_reduce(t, op=dist.ReduceOp.SUM)
                        got[normalize] = (loss / WORLD, g_hidden / WORLD, g_head / WORLD)  # the ranks' mean
                    # One process on all 5 rows (no process group is consulted under `rank`).
                    one = loss_and_grads(b, slice(0, N), T, LossConfig(beta=0.04, aggregation=aggregation,
                                                                        kl_on=kl_on), kl_on, weighted)
                    for name, a, r in zip(("loss", "hidden grad", "head grad"), got["global"], one):
                        if not torch.allclose(a, r, rtol=1e-5, atol=1e-7):
                            failures.append(f"global != one process: {name} ({what}): {(a - r).abs().max():.3g}")
                    if all(torch.allclose(a, r, rtol=1e-5, atol=1e-7) for a, r in zip(got["rank"][1:], one[1:])):
                        failures.append(f"rank == one process ({what}): the split does not test anything")
        dist.barrier()  # both ranks done talking before either tears gloo down (tests/_fsdp_fused_worker.py)
        if failures:
            raise AssertionError("\n".join(failures))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(sys.argv[1],), nprocs=WORLD, join=True)
    print("OK")

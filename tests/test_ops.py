"""`ktr.ops.exp_shifted_`: the CPU-fast exponential of shifted logits keeps every normal value's bits and the
row sums', and drops only what would be subnormal (or within 1% of the smallest normal number)."""

import math

import pytest
import torch

from ktr.ops import exp_shifted_


def _shifted(rows: int, scale: float, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(scale))
    z = (torch.randn(rows, 151936, generator=g) * scale).to(dtype)
    z[0, :1000] = -float("inf")  # suppressed entries
    z[1, 1:] = -200.0  # every entry but the first underflows
    return z - z.amax(-1, keepdim=True)  # [R, V] <= 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1.0, 40.0, 400.0])
def test_normal_values_and_row_sums_keep_their_bits(scale, dtype) -> None:
    z = _shifted(4, scale, dtype)
    plain = z.exp()
    mine = exp_shifted_(z.clone())
    cut = math.exp(math.log(torch.finfo(dtype).tiny) + 0.011)
    kept = plain > cut
    assert torch.equal(mine[kept], plain[kept])
    assert not mine[~kept].any()
    assert bool((plain[~kept] <= cut).all())
    assert torch.equal(mine.sum(-1), plain.sum(-1))
    if scale >= (40.0 if dtype == torch.float32 else 400.0):  # the case it is for: much of a row is below the cut
        assert (~kept).float().mean() > 0.3
    entropy = lambda e: (e.sum(-1).log() - (e * z.nan_to_num(neginf=0.0)).sum(-1) / e.sum(-1))  # noqa: E731
    torch.testing.assert_close(entropy(mine), entropy(plain), rtol=0, atol=1e-30)


def test_row_scaling_keeps_normal_products_and_leaves_no_subnormals() -> None:
    from ktr.ops import mul_rows_

    e = exp_shifted_(_shifted(4, 40.0, torch.float32))  # [4, V] >= 0, no subnormals
    scale = torch.tensor([-1e-3, 2.5e-6, 0.0, 1.0])
    plain = e * scale[:, None]
    mine = mul_rows_(e.clone(), scale)
    tiny = torch.finfo(torch.float32).tiny
    normal = plain.abs() >= tiny
    assert torch.equal(mine[normal], plain[normal])
    assert not mine[~normal].any()
    assert bool(((plain != 0) & ~normal).any()), "no product was subnormal: the case is not exercised"
    assert not bool(((mine != 0) & (mine.abs() < tiny)).any())

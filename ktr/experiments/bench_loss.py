"""Naive vs chunked policy loss from hidden states: peak extra memory, forward+backward time, grad error
(layer L4, a benchmark driver). `scripts/bench_loss.py` is its command line (and the protocol: its docstring).

The op is the KTR training loss (``beta=0.04`` with reference log-probs, ``seq-mean-token-mean``) followed
by ``backward()``; gradients w.r.t. hidden states and weight are compared with the naive ones:
``max_rel_grad_err = max over {hidden, weight} of max|g - g_naive| / max|g_naive|``.
``cpu_worker`` measures one case in a fresh process (the script runs one per case); ``inprocess_records`` is
the GPU path, in this process (``ktr.experiments.gpu_check`` calls it; on CPU it runs the same code with no
memory figure, for tests).
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

import torch

from ktr.fused import fused_policy_loss, naive_policy_loss

SEQ_LEN_CPU, SEQ_LEN_GPU = 512, 2048


def make_inputs(tokens: int, seq_len: int, vocab: int, hidden: int, dtype: torch.dtype, device: str) -> dict:
    """Seeded inputs: hidden ``[N, T, H]`` and weight ``[V, H]`` with grad, ids, advantages, reference."""
    # drawn on `device`: a random [V, H] weight at H = 3,584 takes many seconds on the host
    g = torch.Generator(device).manual_seed(0)
    n, t = tokens // seq_len, seq_len
    h = torch.randn(n, t, hidden, generator=g, device=device)
    w = torch.randn(vocab, hidden, generator=g, device=device) * hidden**-0.5
    return dict(
        hidden=h.to(dtype).requires_grad_(),
        weight=w.to(dtype).requires_grad_(),
        tokens=torch.randint(0, vocab, (n, t), generator=g, device=device),
        advantages=torch.randn(n, generator=g, device=device),
        mask=torch.ones(n, t, dtype=torch.bool, device=device),
        ref_logps=torch.randn(n, t, generator=g, device=device) - 5.0,
    )


def step(inputs: dict, case: dict) -> None:
    """One forward + backward of the loss; grads land in ``hidden.grad`` / ``weight.grad``."""
    args = [inputs[k] for k in ("hidden", "weight", "tokens", "advantages", "mask")]
    kw = dict(ref_logps=inputs["ref_logps"], beta=0.04, with_entropy=case["entropy"])
    if case["impl"] == "naive":
        loss, _, _ = naive_policy_loss(*args, **kw)
    else:
        loss, _, _ = fused_policy_loss(*args, chunk_size=case["chunk"], strategy=case["strategy"], **kw)
    loss.backward()


def rel_err(grads: dict, ref: dict) -> float:
    return max(((grads[k].float() - ref[k].float()).abs().max() / ref[k].float().abs().max()).item() for k in ref)


# ------------------------------------------------------------------------------------------------------
# CPU: one subprocess per case (started by scripts/bench_loss.py).


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak() -> bool:
    try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def cpu_worker(case: dict) -> dict:
    """Runs in the subprocess: measure ``case`` and return its record (also stores/loads reference grads)."""
    if case["threads"]:
        torch.set_num_threads(case["threads"])
    inputs = make_inputs(case["tokens"], SEQ_LEN_CPU, case["vocab"], case["hidden"], torch.float32, "cpu")
    walls, cpus, peak_kb = [], [], 0
    for _ in range(case["repeats"]):
        inputs["hidden"].grad = inputs["weight"].grad = None
        base_kb = _status_kb("VmRSS")
        exact = _reset_peak()
        t0, c0 = time.perf_counter(), time.process_time()
        step(inputs, case)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        hwm = _status_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_kb = max(peak_kb, hwm - base_kb)
    grads = {k: inputs[k].grad for k in ("hidden", "weight")}
    ref_path = Path(case["ref_path"])
    if case["impl"] == "naive":
        torch.save(grads, ref_path)
        err = 0.0
    else:
        err = rel_err(grads, torch.load(ref_path)) if ref_path.exists() else float("nan")
    return _record(case, peak_kb / 1024, min(walls), min(cpus), err, "cpu")


def _record(case: dict, peak_mb: float, wall: float, cpu: float | None, err: float, device: str) -> dict:
    chunk = None if case["impl"] == "naive" else case["chunk"]
    strategy = None if case["impl"] == "naive" else case["strategy"]
    return dict(impl=case["impl"], strategy=strategy, tokens=case["tokens"], vocab=case["vocab"],
                hidden=case["hidden"], chunk=chunk, peak_mem_mb=round(peak_mb, 1), time_s=round(wall, 3),
                cpu_s=None if cpu is None else round(cpu, 3), max_rel_grad_err=err, device=device)


# ------------------------------------------------------------------------------------------------------
# GPU: in process, CUDA allocator counters (the same code runs on CPU without a memory figure).


def run_gpu_case(case: dict, inputs: dict, ref: dict | None) -> tuple[dict, dict]:
    device = inputs["hidden"].device
    cuda = device.type == "cuda"
    walls, peak = [], 0
    for i in range(case["repeats"] + 1):  # the first run warms up kernels and the allocator
        inputs["hidden"].grad = inputs["weight"].grad = None
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        step(inputs, case)
        if cuda:
            torch.cuda.synchronize()
            peak = max(peak, torch.cuda.max_memory_allocated() - base)
        if i:
            walls.append(time.perf_counter() - t0)
    grads = {k: inputs[k].grad for k in ("hidden", "weight")}
    inputs["hidden"].grad = inputs["weight"].grad = None
    err = 0.0 if ref is None else rel_err(grads, ref)
    rec = _record(case, peak / 2**20, min(walls), None, err, torch.cuda.get_device_name(device) if cuda else "cpu")
    if not cuda:
        rec["peak_mem_mb"] = None  # no in-process peak on CPU (the CPU mode measures in subprocesses)
    return rec, grads


def inprocess_records(tokens: list[int], hidden: int, vocab: int, chunks: list[int], strategies: list[str],
                      entropy: bool = False, repeats: int = 2, device: str = "cuda", seq_len: int = SEQ_LEN_GPU,
                      dtype: torch.dtype = torch.bfloat16, log=None) -> list[dict]:
    """The ``--gpu`` benchmark: for each N*T in `tokens`, naive then every (strategy, chunk), in this process."""
    common = dict(vocab=vocab, hidden=hidden, entropy=entropy, repeats=repeats, threads=0, strategy=None, chunk=None)
    records = []
    for n_tok in tokens:
        cases = [dict(common, impl="naive", tokens=n_tok)] + [
            dict(common, impl="chunked", tokens=n_tok, chunk=c, strategy=s) for s in strategies for c in chunks]
        inputs, ref = make_inputs(n_tok, seq_len, vocab, hidden, dtype, device), None
        for case in cases:
            rec, grads = run_gpu_case(case, inputs, ref)
            ref = grads if case["impl"] == "naive" else ref
            records.append(rec)
            if log is not None:
                log(rec)
        del ref, inputs
    return records


# ------------------------------------------------------------------------------------------------------

"""The README's demo learns: `ktr fit --config configs/demo.yaml`, as a user runs it, on two seeds.

Guards the RL stage itself, not only the code paths: after the warm start, 60 Video-KTR steps must raise the
held-out `val/p_target` (teacher-forced probability of the right answer text, continuous) by a margin taken from
the seed table in `docs/demo_seeds.md` (scripts/demo_seeds.py), must not lower greedy accuracy, and must bring it to
at least `ACC_FLOOR`. The two seeds run at once in subprocesses with one torch thread each (about 4 minutes on
2 cores).

Seeds 0 and 1 are the guard's seeds since it was written. The `p_target` margin does not hold on every seed: on
some (1 in 10 with either `sampling.draw`) the unrewarded `<think>` text drifts late in RL, since Video-KTR's KL
term covers key tokens only, and `p_target` falls while accuracy reaches 1.000 (docs/demo_seeds.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (0, 1)
P_TARGET_MARGIN = 0.10
"""Smallest rise of `val/p_target` over the RL steps accepted on each seed. Seeds 0 and 1 rose by +0.239 and +0.254
(docs/demo_seeds.md, 2026-12-07, `draw: inverse_cdf`; +0.281 on both with the earlier multinomial draw); the code
before the tie fix (untied scores, lr 3e-4, beta 0) rose by about +0.08."""
ACC_FLOOR = 0.9
"""Held-out greedy accuracy each seed must reach after RL: 1.000 in all 32 seed runs of docs/demo_seeds.md (both
draws, Video-KTR and GRPO, 2026-12-06/07; 0.734 after the warm start), where the code before the tie fix stayed
at 0.516."""


def _scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted(run_dir.rglob("events.out.tfevents*"))
    assert events, f"no TensorBoard events under {run_dir}"
    acc = EventAccumulator(str(events[-1]), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


@pytest.mark.slow
def test_demo_rl_stage_raises_p_target_on_every_seed(tmp_path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    procs = {}
    for seed in SEEDS:
        cmd = [sys.executable, "-m", "ktr", "fit", "--config", "configs/demo.yaml", f"--seed_everything={seed}",
               "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
               f"--trainer.logger.init_args.save_dir={tmp_path / str(seed)}", "--model.init_args.val_target_prob=true"]
        log = (tmp_path / f"{seed}.log").open("w")
        procs[seed] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log)
    for seed, (proc, log) in procs.items():
        rc = proc.wait(timeout=1500)
        log.close()
        assert rc == 0, f"demo seed {seed} failed:\n{(tmp_path / f'{seed}.log').read_text()[-3000:]}"
    figures = {}
    for seed in SEEDS:
        run = tmp_path / str(seed)
        p, acc = _scalars(run, "val/p_target"), _scalars(run, "val/acc")
        warm = [i for i, (step, _) in enumerate(p) if step < 90][-1]  # the validation right after the warm start
        figures[seed] = {"p_target": (p[warm][1], p[-1][1]), "acc": (acc[warm][1], acc[-1][1])}
    message = "; ".join(f"seed {s}: p_target {f['p_target'][0]:.3f} -> {f['p_target'][1]:.3f}, acc "
                        f"{f['acc'][0]:.3f} -> {f['acc'][1]:.3f}" for s, f in figures.items())
    for seed, f in figures.items():
        assert f["p_target"][1] - f["p_target"][0] >= P_TARGET_MARGIN, f"RL did not raise p_target by " \
            f"{P_TARGET_MARGIN} on seed {seed}: {message}"
        assert f["acc"][1] >= f["acc"][0], f"RL lowered held-out accuracy on seed {seed}: {message}"
        assert f["acc"][1] >= ACC_FLOOR, f"held-out accuracy below {ACC_FLOOR} after RL on seed {seed}: {message}"

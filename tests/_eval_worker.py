"""One rank of the two-process evaluation test (tests/test_evaluator.py): `ktr test` on the demo benchmark.

Usage: python tests/_eval_worker.py RANK WORLD PORT OUT_DIR. Runs from the repository root; writes
OUT_DIR/rank<RANK>.json with the questions this rank generated and the metric it logged.
"""

from __future__ import annotations

import json
import os
import sys


def run(rank: int, world: int, port: int, out: str) -> None:
    # Lightning's LightningEnvironment: processes started externally, one per rank (no launcher, no spawn)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0", HF_HUB_OFFLINE="1")
    import torch

    torch.set_num_threads(1)
    from ktr.callbacks import SyntheticBenchmark
    from ktr.cli import end_process_group, main

    # default_root_dir: with no logger, LightningCLI saves config.yaml there (not in the repository)
    cli = main(["test", "--config", "configs/demo_eval.yaml", "--trainer.devices", str(world),
                "--trainer.strategy", "ddp", "--trainer.logger", "false", "--trainer.default_root_dir", out,
                "--trainer.enable_progress_bar", "false",
                "--trainer.callbacks.num_questions", "7", "--trainer.callbacks.output_dir", os.path.join(out, "eval"),
                "--trainer.callbacks.decoding.batch_size", "2", "--trainer.callbacks.decoding.max_new_tokens", "4"])
    evaluator = next(c for c in cli.trainer.callbacks if isinstance(c, SyntheticBenchmark))
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "generated": evaluator.last_generated, "metrics": metrics,
                   "world": torch.distributed.get_world_size()}, f)
    end_process_group()  # as the `ktr` console script does after a run


if __name__ == "__main__":
    run(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])

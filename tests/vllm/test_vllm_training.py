"""A 3-step KTR run with `sampling.backend: vllm` (one engine for this module): the weights change, the engine
follows them (greedy tokens equal transformers' after step 3), the engine/policy log-prob gap and the TIS weight
are logged, and evaluation through the same engine writes a `results.json` with the keys of an HF evaluation."""

import json
import sys
from pathlib import Path

import pytest

from tests.vllm.conftest import SKIP_REASON, release_engine

pytest.importorskip("vllm", reason=SKIP_REASON)

import torch  # noqa: E402

from ktr.callbacks import DecodingConfig, EvalVideoSettings, SyntheticBenchmark  # noqa: E402
from ktr.data.synthetic import SyntheticSpec  # noqa: E402
from ktr.model.policy import load_policy  # noqa: E402
from ktr.rollout.hf import generate  # noqa: E402
from tests.helpers import synthetic_samples  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
VIDEO = dict(fps=4.0, min_frames=4, max_frames=8, min_pixels=3136, max_pixels=3136)


def _keys(d, prefix=""):
    """Every key path of a nested dict (lists are leaves)."""
    out = set()
    for k, v in d.items():
        out.add(prefix + k)
        if isinstance(v, dict):
            out |= _keys(v, prefix + k + ".")
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from ktr.cli import main

    sys.argv = ["ktr"]
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("fit")
    args = ["fit", "--config", str(REPO / "configs" / "demo_vllm.yaml"),
            "--trainer.logger.init_args.save_dir", str(tmp),
            "--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--trainer.enable_progress_bar", "false",
            "--data.init_args.val_size", "2", "--data.init_args.batch_size", "2",
            "--model.init_args.sampling.group_size", "4", "--model.init_args.sampling.max_new_tokens", "6",
            "--model.init_args.warm_start_steps", "0", "--model.init_args.val_max_new_tokens", "4",
            "--model.init_args.optim.lr", "1e-2", "--model.init_args.loss.rollout_correction", "tis",
            # own output projection: the tied random model's greedy tokens repeat the last input token
            "--model.init_args.policy.tiny.tie_word_embeddings", "false",
            "--model.init_args.rewards.names", "[tests.helpers:length_reward, format]",
            "--trainer.callbacks+=ktr.callbacks.SyntheticBenchmark", "--trainer.callbacks.num_questions=2",
            "--trainer.callbacks.every_n_steps=3", "--trainer.callbacks.decoding.backend=vllm",
            "--trainer.callbacks.decoding.max_new_tokens=4",
            *[f"--trainer.callbacks.video.{k}={v}" for k, v in VIDEO.items()]]
    cli = main(args)
    yield cli, tmp
    release_engine(cli.model.rollout_backend)


def test_three_steps_change_the_weights_and_the_engine_follows(run) -> None:
    cli, _ = run
    module = cli.model
    assert cli.trainer.global_step == 3
    start = load_policy(module.policy_cfg).model  # the tiny model is rebuilt from its seed
    changed = [k for k, v in module.model.named_parameters() if not torch.equal(v, dict(start.named_parameters())[k])]
    assert any("language_model.layers" in k for k in changed)
    policy_batch = module.processor.collate(synthetic_samples(module.processor, 2, image_every=2))
    cfg = module.sampling
    hf = generate(module.model, module.processor, policy_batch, cfg, group_size=1, greedy=True)
    before = generate(start, module.processor, policy_batch, cfg, group_size=1, greedy=True)
    assert not torch.equal(hf.completion_ids, before.completion_ids)  # training moved the greedy answers
    got = module.rollout_backend.generate(module.model, module.processor, policy_batch, cfg, group_size=1, greedy=True)
    assert torch.equal(got.completion_ids, hf.completion_ids)
    metrics = cli.trainer.callback_metrics
    print("METRICS", {k: float(v) for k, v in metrics.items() if k.startswith("train/rollout")})
    assert 0 <= float(metrics["train/rollout/logp_diff"]) < 1e-2  # the video position gap, see ktr.rollout.vllm
    assert 0 < float(metrics["train/rollout/tis_weight"]) <= 2.0


def test_evaluation_through_vllm_has_the_hf_results_keys(run) -> None:
    cli, tmp = run
    module = cli.model
    root = next(tmp.rglob("eval/synthetic"))
    vllm_res = json.loads((root / "step_0000003" / "results.json").read_text())
    assert vllm_res["n_scored"] == 2 and vllm_res["settings"]["decoding"]["backend"] == "vllm"
    hf = SyntheticBenchmark(num_questions=2, data_dir=str(root / "data"), video=EvalVideoSettings(**VIDEO),
                            decoding=DecodingConfig(max_new_tokens=4), spec=SyntheticSpec())
    hf_res = hf.evaluate(module.model, module.processor, tmp / "hf", checkpoint=vllm_res["settings"]["checkpoint"])
    assert _keys(vllm_res) == _keys(hf_res)
    preds = [json.loads(line) for line in (root / "step_0000003" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 2 and all(p["output"] is not None for p in preds)

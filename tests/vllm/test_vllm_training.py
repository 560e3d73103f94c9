"""A 3-step KTR run with `sampling.backend: vllm`, on Qwen2.5-VL and on Qwen3-VL (one engine at a time): the
weights change, the engine follows them (greedy tokens equal transformers' after step 3), the engine/policy
log-prob gap and the TIS weight are logged, the engine sleeps after every rollout and wakes for every sync (the
default `sleep: level1`; on the CPU engine a scheduler pause, see `ktr.rollout.vllm_memory`) with its memory per
phase logged, and evaluation through the same engine writes a `results.json` with the keys of an HF evaluation."""

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
FAMILIES = {  # policy name -> frame size (a multiple of the family's resize factor: 28, 32)
    "tiny": dict(fps=4.0, min_frames=4, max_frames=8, min_pixels=3136, max_pixels=3136),
    "tiny-qwen3vl": dict(fps=4.0, min_frames=4, max_frames=8, min_pixels=4096, max_pixels=4096),
}


def _keys(d, prefix=""):
    """Every key path of a nested dict (lists are leaves)."""
    out = set()
    for k, v in d.items():
        out.add(prefix + k)
        if isinstance(v, dict):
            out |= _keys(v, prefix + k + ".")
    return out


@pytest.fixture(scope="module", params=list(FAMILIES))
def run(request, tmp_path_factory):
    from ktr.cli import main

    sys.argv = ["ktr"]
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("fit")
    video = FAMILIES[request.param]
    args = ["fit", "--config", str(REPO / "configs" / "demo_vllm.yaml"),
            "--trainer.logger.init_args.save_dir", str(tmp),
            "--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--trainer.enable_progress_bar", "false",
            "--data.init_args.val_size", "2", "--data.init_args.batch_size", "2",
            *[f"--data.init_args.video.{k}={v}" for k, v in video.items()],
            "--model.init_args.policy.name_or_path", request.param,
            "--model.init_args.sampling.group_size", "4", "--model.init_args.sampling.max_new_tokens", "6",
            "--model.init_args.warm_start_steps", "0", "--model.init_args.val_max_new_tokens", "4",
            "--model.init_args.optim.lr", "1e-2", "--model.init_args.loss.rollout_correction", "tis",
            # own output projection: the tied random model's greedy tokens repeat the last input token
            "--model.init_args.policy.tiny.tie_word_embeddings", "false",
            "--model.init_args.rewards.names", "[tests.helpers:length_reward, format]",
            "--trainer.callbacks+=ktr.callbacks.SyntheticBenchmark", "--trainer.callbacks.num_questions=2",
            "--trainer.callbacks.every_n_steps=3", "--trainer.callbacks.decoding.backend=vllm",
            "--trainer.callbacks.decoding.max_new_tokens=4",
            *[f"--trainer.callbacks.video.{k}={v}" for k, v in video.items()]]
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
    assert {f"train/rollout/memory_gib/{p}" for p in ("generated", "slept", "woke_weights", "synced")} <= set(metrics)


def test_the_engine_slept_after_every_rollout_and_woke_for_every_sync(run) -> None:
    """The phases of the real engine over the run: built at the first rollout, then per step generate, sleep,
    wake the weights, sync, and the KV cache woken before the next rollout (evaluation at step 3 too)."""
    cli, _ = run
    backend = cli.model.rollout_backend
    phases = [p["phase"] for p in backend.timeline.phases]
    step = ["generated", "slept", "woke_weights", "synced"]
    first_two = ["built", *step, "woke_kv_cache", *step]
    assert phases[:len(first_two)] == first_two
    assert phases.count("synced") >= 3 and phases.count("slept") >= 4  # 3 steps, then the evaluation's batches
    assert all(phases[i - 1] == "slept" for i, p in enumerate(phases) if p == "woke_weights")
    assert phases[phases.index("synced", len(first_two)) + 1:][:3] == ["woke_kv_cache", "generated", "slept"]
    plan = backend.plan  # sized from the run: G = 4 samples of 2 prompts; max_model_len 2048 (demo_vllm.yaml)
    assert plan.max_num_seqs == 4 * 2 and plan.max_num_batched_tokens == plan.max_model_len == 2048
    assert backend.engine.llm_engine.vllm_config.scheduler_config.max_num_seqs == plan.max_num_seqs


def test_evaluation_through_vllm_has_the_hf_results_keys(run) -> None:
    cli, tmp = run
    module = cli.model
    video = FAMILIES[module.policy_cfg.name_or_path]
    root = next(tmp.rglob("eval/synthetic"))
    vllm_res = json.loads((root / "step_0000003" / "results.json").read_text())
    assert vllm_res["n_scored"] == 2 and vllm_res["settings"]["decoding"]["backend"] == "vllm"
    hf = SyntheticBenchmark(num_questions=2, data_dir=str(root / "data"), video=EvalVideoSettings(**video),
                            decoding=DecodingConfig(max_new_tokens=4), spec=SyntheticSpec())
    hf_res = hf.evaluate(module.model, module.processor, tmp / "hf", checkpoint=vllm_res["settings"]["checkpoint"])
    assert _keys(vllm_res) == _keys(hf_res)
    preds = [json.loads(line) for line in (root / "step_0000003" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 2 and all(p["output"] is not None for p in preds)

"""Benchmark evaluator callbacks end to end on the tiny model: the real fixture rows with small synthetic
videos written where the rows expect them, results and predictions files, resume, skipped videos, `ktr test`
from the demo config / a training checkpoint / a Hugging Face directory / a LoRA adapter, and two ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ktr import callbacks as C
from ktr.callbacks import DecodingConfig, EvalVideoSettings, SyntheticBenchmark
from ktr.config import PolicyConfig
from ktr.data.video import write_video
from ktr.eval import prompt_hash, summarize
from ktr.model.policy import load_policy
from tests import FIXTURES as FIXTURES_ROOT
from tests.helpers import free_port

REPO = Path(__file__).resolve().parents[1]
FIXTURES = FIXTURES_ROOT / "benchmarks"
RESULT_KEYS = {"overall", "overall_answered", "overall_readable", "breakdown", "n_questions", "n_scored", "n_skipped",
               "n_unparsable", "settings"}
SETTING_KEYS = {"decoding", "frames", "pixels", "prompt_variant", "extraction_rule", "checkpoint"}
# 2 frames of 56x56 -> one merged vision token; greedy, since Hugging Face's top-p sorts the whole vocabulary
# every step (most of the tiny model's time). The released decoding runs in the fit and two-process tests.
SMALL = dict(video=EvalVideoSettings(fps=2.0, min_frames=2, max_frames=2, min_pixels=3136, max_pixels=3136),
             decoding=DecodingConfig(temperature=0.0, max_new_tokens=8, batch_size=8))
GREEDY_DEMO = dict(video=EvalVideoSettings(fps=4.0, min_frames=4, max_frames=8, min_pixels=3136, max_pixels=3136),
                   decoding=DecodingConfig(temperature=0.0, max_new_tokens=6, batch_size=4))


@pytest.fixture(scope="module")
def fx() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"benchmark fixtures not found at {FIXTURES}")
    return FIXTURES


@pytest.fixture(autouse=True)
def _argv(monkeypatch):  # `ktr.cli.main(args)` warns when pytest's own arguments are in sys.argv
    monkeypatch.setattr(sys, "argv", ["ktr"])


@pytest.fixture(scope="module")
def policy(tiny_policy):
    return tiny_policy  # conftest: the tiny model, built once per session


def _write_videos(paths, skip=()) -> None:
    """A 4-frame 56x56 clip at 2 fps at each path (distinct content per path), except those in ``skip``."""
    for k, path in enumerate(sorted(set(paths) - set(skip))):
        frames = torch.full((4, 3, 56, 56), 16 + 20 * (k % 10), dtype=torch.uint8)  # [F, 3, H, W]
        frames[:, k % 3, 14:42, 14:42] = 230
        write_video(path, frames, 2.0)


def _predictions(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


CASES = [  # evaluator, fixture file, format, questions evaluated (subset)
    (C.VideoMME, "videomme_sample.json", "video_r1", None),
    (C.VideoMME, "videomme_sample.json", "official", 8),
    (C.TempCompass, "tempcompass_sample.json", "official", 12),
    (C.VideoMMMU, "videommmu_sample.json", "video_r1", 8),
    (C.MMVU, "mmvu_sample.json", "official", 8),
    (C.MMVU, "mmvu_videor1_format_sample.json", "video_r1", 8),
    (C.VideoHolmes, "videoholmes_sample.json", "official", 8),
    (C.VideoHolmes, "videoholmes_videor1_format_sample.json", "video_r1", 8),
]


@pytest.mark.parametrize(("cls", "file", "fmt", "subset"), CASES, ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.slow
def test_each_benchmark_end_to_end(fx, policy, tmp_path, cls, file, fmt, subset):
    ev = cls(fx / file, tmp_path / "videos" / "Evaluation", fmt, subset=subset, **SMALL)
    items = ev.benchmark.load()[:subset]
    _write_videos(it.video_path for it in items)
    res = ev.evaluate(policy.model, policy.processor, tmp_path / "out", checkpoint={"name_or_path": "tiny"})

    assert RESULT_KEYS <= set(res) and SETTING_KEYS <= set(res["settings"])
    assert res == json.loads((tmp_path / "out" / "results.json").read_text())
    assert (res["n_scored"], res["n_skipped"]) == (len(items), 0)
    assert res["settings"]["pixels"]["max_pixels"] == 3136 and res["settings"]["frames"]["max_frames"] == 2
    assert res["settings"]["extraction_rule"] == ev.benchmark.extraction_rule
    assert sorted(ev.last_generated) == sorted(it.qid for it in items)
    # breakdowns: every field, exactly the groups of the evaluated items, counts adding up
    assert set(res["breakdown"]) == set(ev.benchmark.breakdown_fields)
    for name, groups in res["breakdown"].items():
        expected = {ev.benchmark.breakdown_keys(it)[name] for it in items}
        assert set(groups) == expected and sum(g["n"] for g in groups.values()) == len(items)
    # predictions: one line per question, re-scored identically from the raw output
    lines = _predictions(tmp_path / "out" / "predictions.jsonl")
    preds = {p["qid"]: p for p in lines}
    assert set(preds) == {it.qid for it in items} and len(lines) == len(items)
    for it in items:
        p = preds[it.qid]
        again = ev.benchmark.evaluate(p["output"], it, prompt_hash(it.prompt_text))
        assert p["prompt_hash"] == prompt_hash(it.prompt_text) and isinstance(p["output"], str)
        assert (p["extracted"], p["correct"], p["score"]) == (again["extracted"], again["correct"], again["score"])
    assert res["overall"] == pytest.approx(sum(p["score"] for p in preds.values()) / len(items))
    assert res["n_unparsable"] == sum(not p["parsed"] for p in preds.values())
    if subset is None:  # the full Video-MME sample: 8 questions per duration
        assert {g: c["n"] for g, c in res["breakdown"]["duration"].items()} == {"long": 8, "medium": 8, "short": 8}


def test_missing_and_unreadable_videos_are_skipped_and_listed_then_retried(fx, policy, tmp_path):
    ev = C.VideoMME(fx / "videomme_sample.json", tmp_path / "v", "video_r1", **SMALL)
    items = ev.benchmark.load()
    videos = sorted({it.video_path for it in items})
    missing, corrupt = videos[0], videos[1]
    _write_videos(videos, skip={missing, corrupt})
    Path(corrupt).write_bytes(b"not a video at all" * 10)
    res = ev.evaluate(policy.model, policy.processor, tmp_path / "out")

    bad = {it.qid: it.video_path for it in items if it.video_path in (missing, corrupt)}
    assert len(bad) == 4  # 7D-gxaie6UI and HIjX8OPuf-w: two questions each
    assert (res["n_skipped"], res["n_scored"]) == (4, 20)
    assert {s["qid"] for s in res["skipped"]} == set(bad)
    reasons = {s["qid"]: s["reason"] for s in res["skipped"]}
    assert all(("FileNotFoundError" if bad[q] == missing else "MediaDecodeError") in r for q, r in reasons.items())
    assert not set(bad) & set(ev.last_generated) and len(ev.last_generated) == 20
    # counted wrong, as the official scripts count a question that raised: in every denominator but `readable`
    assert sum(g["n"] for g in res["breakdown"]["duration"].values()) == res["n_questions"] == 24
    right = sum(p["score"] for p in _predictions(tmp_path / "out" / "predictions.jsonl") if not p["skipped"])
    assert (res["overall"], res["overall_readable"]) == (pytest.approx(right / 24), pytest.approx(right / 20))

    _write_videos([missing, corrupt])  # the videos arrive: a re-run answers only the skipped questions
    res = ev.evaluate(policy.model, policy.processor, tmp_path / "out")
    assert sorted(ev.last_generated) == sorted(bad) and (res["n_skipped"], res["n_scored"]) == (0, 24)


def test_resume_skips_answered_questions(policy, tmp_path):
    def evaluator(subset, **kw):
        return SyntheticBenchmark(num_questions=6, subset=subset, data_dir=str(tmp_path / "data"), **{**SMALL, **kw})

    out = tmp_path / "out"
    ev = evaluator(4)
    ev.evaluate(policy.model, policy.processor, out)
    qids = [it.qid for it in ev.benchmark.load()]
    assert ev.last_generated == qids[:4]
    ev = evaluator(None)
    res = ev.evaluate(policy.model, policy.processor, out)
    assert ev.last_generated == qids[4:] and res["n_scored"] == 6
    assert [p["qid"] for p in _predictions(out / "predictions.jsonl")] == qids

    data = (out / "predictions.jsonl").read_bytes()  # a run killed mid-write leaves half a line
    (out / "predictions.jsonl").write_bytes(data[: len(data) - 40])
    res2 = ev.evaluate(policy.model, policy.processor, out)
    assert ev.last_generated == qids[5:]
    assert [p["qid"] for p in _predictions(out / "predictions.jsonl")] == qids
    assert {k: v for k, v in res2.items() if k != "settings"} == {k: v for k, v in res.items() if k != "settings"}

    with pytest.raises(ValueError, match="other settings.*decoding"):  # never mixes answers of two settings
        evaluator(None, decoding=DecodingConfig(temperature=0.0, max_new_tokens=9)).evaluate(
            policy.model, policy.processor, out)
    ev = evaluator(None, decoding=DecodingConfig(temperature=0.0, max_new_tokens=8, batch_size=3))  # may change
    ev.evaluate(policy.model, policy.processor, out)
    assert ev.last_generated == []
    ev.evaluate(policy.model, policy.processor, out, fresh=True)  # fit: a step folder is never resumed
    assert ev.last_generated == qids and len(_predictions(out / "predictions.jsonl")) == 6


def test_cross_check_catches_lost_or_doubled_questions(policy):
    ev = SyntheticBenchmark(num_questions=2)
    recs = [{"qid": "a", "score": 1.0, "parsed": True, "keys": {}, "skipped": None},
            {"qid": "b", "score": 0.0, "parsed": False, "keys": {}, "skipped": None}]
    results = summarize(recs)
    ev._cross_check(results, recs, policy.model)  # the same records: passes
    with pytest.raises(RuntimeError, match="disagree"):
        ev._cross_check(results, recs[:1], policy.model)
    with pytest.raises(RuntimeError, match="disagree"):
        ev._cross_check(results, recs + recs[:1], policy.model)


def _ktr_test(tmp_path: Path, *extra: str):
    from ktr.cli import main

    return main(["test", "--config", str(REPO / "configs" / "demo_eval.yaml"),
                 "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
                 "--trainer.enable_progress_bar", "false",
                 "--trainer.callbacks.num_questions", "4", "--trainer.callbacks.data_dir", str(tmp_path / "data"),
                 "--trainer.callbacks.decoding.temperature", "0", "--trainer.callbacks.decoding.max_new_tokens", "6",
                 "--trainer.callbacks.decoding.batch_size", "4", *extra])


@pytest.mark.slow
def test_ktr_test_demo_config_writes_results(tmp_path):
    cli = _ktr_test(tmp_path)
    out = tmp_path / "runs" / "demo_eval" / "version_0" / "eval" / "synthetic"
    res = json.loads((out / "results.json").read_text())
    assert RESULT_KEYS <= set(res) and SETTING_KEYS <= set(res["settings"]) and res["n_scored"] == 4
    assert res["settings"]["checkpoint"]["name_or_path"] == "tiny"
    assert cli.trainer.callback_metrics["eval/synthetic/acc"] == pytest.approx(res["overall"])
    assert set(res["breakdown"]) == {"kind"}
    rows = json.loads((tmp_path / "data" / "annotation.json").read_text())  # the Video-R1 eval format on disk
    assert rows[0]["path"].startswith("./Evaluation/Synthetic/") and rows[0]["solution"].startswith("<answer>")
    assert len(_predictions(out / "predictions.jsonl")) == 4


@pytest.mark.slow
def test_fit_evaluates_every_n_steps_at_validation(tmp_path):
    from ktr.cli import main

    cli = main(["fit", "--config", str(REPO / "configs" / "demo.yaml"), "--trainer.logger.init_args.save_dir",
                str(tmp_path), "--trainer.max_steps", "3", "--trainer.val_check_interval", "1",
                "--trainer.enable_progress_bar", "false", "--data.init_args.val_size", "2",
                "--data.init_args.batch_size", "1", "--model.init_args.sampling.group_size", "2",
                "--model.init_args.sampling.max_new_tokens", "4", "--model.init_args.warm_start_steps", "0",
                "--model.init_args.val_max_new_tokens", "4", "--trainer.callbacks+=ktr.callbacks.SyntheticBenchmark",
                "--trainer.callbacks.num_questions=3", "--trainer.callbacks.every_n_steps=2",
                "--trainer.callbacks.decoding.max_new_tokens=4"])
    root = tmp_path / "demo" / "version_0" / "eval" / "synthetic"
    assert sorted(p.name for p in root.iterdir()) == ["data", "step_0000002"]  # validations at steps 1, 2, 3
    res = json.loads((root / "step_0000002" / "results.json").read_text())
    assert res["n_scored"] == 3 and res["settings"]["checkpoint"]["global_step"] == 2
    assert cli.trainer.callback_metrics["eval/synthetic/n_scored"] == 3


def _outputs(model, processor, out: Path, data: Path) -> list[str]:
    from ktr.data.synthetic import SyntheticSpec

    demo_eval = dict(spec=SyntheticSpec(kinds=("order",)), wording="train")  # as configs/demo_eval.yaml
    SyntheticBenchmark(num_questions=4, data_dir=str(data), **GREEDY_DEMO, **demo_eval).evaluate(model, processor, out)
    return [p["output"] for p in _predictions(out / "predictions.jsonl")]


def _perturbed(module) -> None:
    """Weights that a training run could have produced: the tiny model plus fixed noise."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


@pytest.mark.parametrize("source", ["checkpoint", "hf_dir", "lora"])
@pytest.mark.slow
def test_ktr_test_from_checkpoint_hf_dir_and_lora(policy, tmp_path, source):
    import lightning as L

    from ktr.module import KTRModule

    data = tmp_path / "data"
    base = _outputs(policy.model, policy.processor, tmp_path / "base", data)
    if source == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(load_policy(PolicyConfig()).model, LoraConfig(
            r=4, lora_alpha=8, init_lora_weights=False, target_modules=r".*language_model.*\.(q_proj|v_proj)"))
        model.save_pretrained(tmp_path / "adapter")
        extra = ["--model.init_args.policy.adapter_path", str(tmp_path / "adapter")]
    else:
        module = KTRModule()
        _perturbed(module.model)
        model = module.model
        if source == "checkpoint":
            trainer = L.Trainer(logger=False, accelerator="cpu", devices=1, enable_model_summary=False)
            trainer.strategy.connect(module)
            trainer.save_checkpoint(tmp_path / "run.ckpt")
            extra = ["--ckpt_path", str(tmp_path / "run.ckpt")]
        else:
            model.save_pretrained(tmp_path / "hf")
            module.processor.tokenizer.save_pretrained(tmp_path / "hf")
            extra = ["--model.init_args.policy.name_or_path", str(tmp_path / "hf")]
    expected = _outputs(model, policy.processor, tmp_path / "expected", data)
    assert expected != base  # the weights matter, so equal outputs below mean they were loaded

    _ktr_test(tmp_path, *extra)
    out = tmp_path / "runs" / "demo_eval" / "version_0" / "eval" / "synthetic"
    assert [p["output"] for p in _predictions(out / "predictions.jsonl")] == expected
    ckpt = json.loads((out / "results.json").read_text())["settings"]["checkpoint"]
    assert ckpt["ckpt_path"] == (str(tmp_path / "run.ckpt") if source == "checkpoint" else None)
    assert ckpt["adapter_path"] == (str(tmp_path / "adapter") if source == "lora" else None)


@pytest.mark.slow
def test_two_process_evaluation_gathers_every_question_once(tmp_path):
    port, env = free_port(), {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, str(REPO / "tests" / "_eval_worker.py"), str(r), "2", str(port),
                               str(tmp_path)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(2)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=150)[0].decode(errors="replace"))
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    qids = [f"synthetic-0-{20_000_000 + i}" for i in range(7)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["generated"] == qids[0::2] and ranks[1]["generated"] == qids[1::2]  # item i -> rank i % 2
    preds = _predictions(tmp_path / "eval" / "predictions.jsonl")
    assert sorted(p["qid"] for p in preds) == qids  # every question exactly once
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert (res["n_scored"], res["n_duplicates"], res["settings"]["world_size"]) == (7, 0, 2)
    assert ranks[0]["metrics"] == ranks[1]["metrics"] and ranks[0]["metrics"]["eval/synthetic/n_scored"] == 7
    assert (tmp_path / "config.yaml").is_file()  # LightningCLI's saved config went to the run, not the repository

"""Bad input and bad settings (issue 18): each way that used to end a run or mislead the user, one test each.

1. a sample that decodes but cannot go through the step (too long, no prompt buildable) is skipped and counted;
2. a data file that cannot be read names file, row/line and what is wrong; one bad line costs only its row;
3. every setting is validated where it is built, naming the key (also through `ktr fit`, in one line);
4. an empty, truncated or foreign checkpoint names the file (`fit --ckpt_path`, `ktr test`, `ktr-export`);
5. a custom reward that fails to import names path and key; one that raises is warned about once;
6. skip counts survive resume, go to the logger with load-time counts; messages give the file's row;
   duplicate problem_ids are reported; ranks skip a step together when one has no usable prompt;
7. no "args passed both ways" warning, `ktr --help` describes ktr, `bench_step` times RL steps.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from ktr.config import (ConfigError, DecodingConfig, KeyTokenConfig, LoraSettings, LossConfig, OptimConfig,
                        RewardConfig, SamplingConfig, SignalConfig, TinyModelConfig)
from ktr.data.base import PromptDataset, SyntheticDataModule
from ktr.data.skips import SkipCounter
from ktr.data.video import ImageSettings, VideoSettings
from ktr.data.videor1 import DataFileError, VideoR1DataModule, load_rows, read_records
from tests.helpers import SMALL_VIDEO, free_port

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")
ROW = {"problem_id": "q1", "problem": "How many?", "data_type": "video", "problem_type": "multiple choice",
       "options": ["A. 1", "B. 2"], "solution": "<answer>A</answer>", "path": "./missing.mp4", "data_source": "x"}


@pytest.fixture
def _argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["ktr"])


def _module(**kw):
    from ktr.config import PolicyConfig
    from ktr.module import KTRModule

    torch.set_num_threads(1)
    sampling = kw.pop("sampling", SamplingConfig(group_size=2, max_new_tokens=6, top_p=1.0))
    return KTRModule(policy=PolicyConfig(attn_implementation="eager"), sampling=sampling, **kw)


def _trainer(max_steps: int, **kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", max_steps=max_steps, enable_progress_bar=False, enable_model_summary=False,
                     limit_val_batches=0, **{"logger": False, "enable_checkpointing": False, **kw})


class _Recorder:
    """A logger keeping every metric key it was given."""

    def __new__(cls):
        from lightning.pytorch.loggers.logger import DummyLogger

        class Recorder(DummyLogger):
            def __init__(self) -> None:
                super().__init__()
                self.keys: set[str] = set()

            def log_metrics(self, metrics, step=None) -> None:
                self.keys |= set(metrics)

        return Recorder()


# ---------------------------------------------------------------------------------- 1. per-sample failures
@pytest.mark.slow
def test_too_long_prompt_is_skipped_counted_and_logged_not_fatal() -> None:
    """Synthetic prompts are 193 or 204 tokens: with max_prompt_length 200 the long ones used to end the run."""
    L.seed_everything(0)
    module = _module(sampling=SamplingConfig(group_size=2, max_new_tokens=4, top_p=1.0, max_prompt_length=200),
                     loss=LossConfig(beta=0.0))
    dm = SyntheticDataModule(batch_size=2, val_size=0, train_size=8, video=SMALL_VIDEO, shuffle=False,
                             max_skip_fraction=1.0)
    logger = _Recorder()
    trainer = _trainer(2, logger=logger, log_every_n_steps=1)
    trainer.fit(module, dm)
    assert trainer.global_step == 2  # the run went on
    # items 1-4 are 204 tokens long: batch [2, 3] has no prompt left (no step), so 3 batches made 2 steps
    skips = module._skips
    assert (skips.seen, skips.skipped, skips.by_reason["PromptTooLong"]) == (6, 4, 4)
    assert "sampling.max_prompt_length=200" in skips.examples[0].reason
    assert {"data/skipped", "data/skipped/PromptTooLong", "data/seen", "data/skipped_total"} <= logger.keys


def test_row_no_prompt_can_be_built_from_is_skipped() -> None:
    """A custom data module's row with a bad field used to raise out of the DataLoader worker."""
    from ktr.data.processor import VisionLanguageProcessor
    from ktr.model.tokenizer import build_qwen2_tokenizer
    from ktr.types import Media

    processor = VisionLanguageProcessor(build_qwen2_tokenizer(), 151655, 151656)
    rows = [dict(ROW, problem_type="essay"), dict(ROW, problem=None)]
    ds = PromptDataset(rows, lambda row: Media("image", torch.zeros(1, 3, 56, 56, dtype=torch.uint8), None),
                       processor)
    for i, field in enumerate(["problem_type", "problem"]):
        item = ds[i]
        assert item.kind == "ValueError" and f"field '{field}'" in item.reason


# ---------------------------------------------------------------------------------- 2. reading a data file
def test_data_file_failures_name_file_line_and_fault(tmp_path) -> None:
    def fails(name: str, data: bytes, pattern: str) -> None:
        f = tmp_path / name
        f.write_bytes(data)
        with pytest.raises(DataFileError, match=pattern):
            read_records(f)

    fails("latin1.json", b'[\n{"problem": "caf\xe9"}]', r"latin1\.json: not UTF-8 text at line 2")
    fails("syntax.json", b'[\n{"problem": 1},\n{"problem" 2}]',
          r"syntax\.json: not valid JSON at line 3 column 12: Expecting .:. delimiter")
    fails("object.json", b'{\n"rows": []\n}', r"object\.json: the file is one JSON object \(keys \['rows'\]\)")
    fails("scalar.json", b"42", r"scalar\.json: the top-level JSON value is a int")
    fails("utf16.json", "[]".encode("utf-16"), r"utf16\.json: the file is UTF-16")
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(DataFileError, match=r"dir\.json: cannot read the data file \(IsADirectoryError"):
        read_records(tmp_path / "dir.json")


def test_one_bad_line_costs_only_its_row(tmp_path) -> None:
    good = json.dumps(ROW).encode()
    f = tmp_path / "train.jsonl"
    f.write_bytes(b"\n".join([good, b'{"problem": "caf\xe9"}', good.replace(b'"q1"', b'"q2"'),
                              good.replace(b"How many?", "How\u2028many?".encode())]) + b"\n")
    rows, report = load_rows(f)
    assert [r["problem_id"] for r in rows] == ["q1", "q2", "q1"]  # U+2028 inside a string does not split a line
    assert report.invalid_rows == 1
    assert report.examples[0].short() == "row 1 (line 2): line is not UTF-8 text: byte 16 of the line, invalid " \
                                         "continuation byte"


# ---------------------------------------------------------------------------------- 3. settings
BAD_SETTINGS = [
    (lambda: SamplingConfig(group_size=0), "sampling.group_size"),
    (lambda: SamplingConfig(max_new_tokens=0), "sampling.max_new_tokens"),
    (lambda: SamplingConfig(temperature=-0.5), "sampling.temperature"),
    (lambda: SamplingConfig(top_p=0.0), "sampling.top_p"),
    (lambda: SamplingConfig(top_p=1.5), "sampling.top_p"),
    (lambda: SamplingConfig(top_k=-1), "sampling.top_k"),
    (lambda: DecodingConfig(top_p=2.0), "decoding.top_p"),
    (lambda: DecodingConfig(max_new_tokens=0), "decoding.max_new_tokens"),
    (lambda: LossConfig(beta=-0.1), "loss.beta"),
    (lambda: LossConfig(clip_low=1.0), "loss.clip_low"),
    (lambda: LossConfig(clip_high=-0.2), "loss.clip_high"),
    (lambda: LossConfig(chunk_size=0), "loss.chunk_size"),
    (lambda: LossConfig(micro_batch_size=0), "loss.micro_batch_size"),
    (lambda: OptimConfig(lr=0.0), "optim.lr"),
    (lambda: OptimConfig(betas=(0.9, 1.0)), r"optim.betas\[1\]"),
    (lambda: OptimConfig(weight_decay=-1.0), "optim.weight_decay"),
    (lambda: OptimConfig(warmup_steps=-1), "optim.warmup_steps"),
    (lambda: OptimConfig(grad_clip=0.0), "optim.grad_clip"),
    (lambda: KeyTokenConfig(visual=SignalConfig(ratio="0.2")), "key_tokens.visual.ratio"),
    (lambda: RewardConfig(names=["accuracy", "format"], weights=[1.0]), "rewards.weights"),
    (lambda: VideoSettings(min_frames=10, max_frames=8), r"video.min_frames \(10\) must be <= video.max_frames"),
    (lambda: VideoSettings(fps=0.0), "video.fps"),
    (lambda: ImageSettings(min_pixels=4000, max_pixels=3000), r"image.min_pixels \(4000\) must be <="),
    (lambda: TinyModelConfig(hidden_size=0), "policy.tiny.hidden_size"),
    (lambda: LoraSettings(dropout=1.0), "policy.lora.dropout"),
    (lambda: SyntheticDataModule(batch_size=0), "data.batch_size"),
    (lambda: SyntheticDataModule(max_skip_fraction=1.5), "data.max_skip_fraction"),
]


@pytest.mark.parametrize("build,key", BAD_SETTINGS, ids=[k.split(" ")[0].replace("\\", "") for _, k in BAD_SETTINGS])
def test_bad_setting_fails_where_built_naming_the_key(build, key) -> None:
    with pytest.raises(ConfigError, match=key):
        build()


@pytest.mark.usefixtures("_argv")
def test_cli_reports_a_bad_setting_in_one_line(capsys) -> None:
    from ktr.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", DEMO, "--model.init_args.sampling.top_p=1.5", "--trainer.max_steps=0"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "ktr: error: invalid setting: sampling.top_p must be in (0, 1], got 1.5" in err
    assert "Traceback" not in err and "Union subtypes" not in err


# ---------------------------------------------------------------------------------- 4. checkpoints
def _bad_checkpoints(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what the message must say)."""
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"model.w": torch.zeros(64, 64)}, "pytorch-lightning_version": "2.6"}, good)
    out = {"empty": (tmp_path / "empty.ckpt", "the file is empty"),
           "truncated": (tmp_path / "truncated.ckpt", "truncated or corrupt"),
           "yaml": (tmp_path / "config.ckpt", "not a PyTorch checkpoint"),
           "plain_state_dict": (tmp_path / "pytorch_model.bin", "not a Lightning checkpoint \\(no 'state_dict'"),
           "pickle_payload": (tmp_path / "evil.ckpt", "safe loading .* refuses")}
    out["empty"][0].write_bytes(b"")
    out["truncated"][0].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    out["yaml"][0].write_text("model:\n  class_path: ktr.module.KTRModule\n")
    torch.save({"lm_head.weight": torch.zeros(2)}, out["plain_state_dict"][0])
    torch.save({"state_dict": {}, "x": _Payload()}, out["pickle_payload"][0])
    return out


class _Payload:
    def __reduce__(self):
        return (print, ("pickle payload ran",))


def test_checkpoint_reader_names_file_and_fault(tmp_path) -> None:
    from ktr.model.checkpoint import CheckpointError, read_checkpoint

    for path, what in _bad_checkpoints(tmp_path).values():
        with pytest.raises(CheckpointError, match=f"{path.name}'?: .*{what}"):
            read_checkpoint(path)
    assert read_checkpoint(tmp_path / "good.ckpt")["state_dict"]["model.w"].shape == (64, 64)


@pytest.mark.usefixtures("_argv")
@pytest.mark.parametrize("command", ["fit", "test", "export"])
@pytest.mark.slow
def test_commands_refuse_a_bad_checkpoint_naming_it(command, tmp_path, capsys) -> None:
    cases = _bad_checkpoints(tmp_path)
    for name in ("empty", "truncated", "plain_state_dict"):
        path, what = cases[name]
        with pytest.raises(SystemExit) as exit_info:
            if command == "export":
                from ktr.export import main as export_main

                export_main(["--config", DEMO, "--ckpt", str(path), "--out", str(tmp_path / "out")])
            else:
                from ktr.cli import main

                config = DEMO if command == "fit" else str(ROOT / "configs" / "demo_eval.yaml")
                main([command, "--config", config, "--ckpt_path", str(path)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and path.name in err and "Traceback" not in err, err
        assert pytest.importorskip("re").search(what, err), err


# ---------------------------------------------------------------------------------- 5. rewards
def test_reward_import_failure_names_path_and_key(tmp_path, monkeypatch) -> None:
    from ktr.rewards import get_reward, resolve_rewards

    (tmp_path / "broken_reward_mod.py").write_text("raise RuntimeError('boom at import')\n")
    (tmp_path / "typo_reward_mod.py").write_text("def fn(c, s, p):\n    return 1.0 +\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="broken_reward_mod:fn.*RuntimeError: boom at import"):
        get_reward("broken_reward_mod:fn")
    with pytest.raises(ConfigError, match=r"rewards.names\[1\]: reward 'typo_reward_mod:fn'.*SyntaxError"):
        resolve_rewards(["accuracy", "typo_reward_mod:fn"])


def failing_reward(completion: str, solution: str, problem_type: str) -> float:
    raise KeyError("no such field")


def test_reward_that_raises_is_warned_once_with_its_name(caplog) -> None:
    from ktr.model.policy import Policy
    from tests.helpers import rollout_for

    module = _module(rewards=RewardConfig(names=["format", "tests.test_reliability:failing_reward"]))
    batch, rollout = rollout_for(Policy(module.model, module.processor), n_prompts=1, group_size=2)
    with caplog.at_level(logging.WARNING, logger="ktr.module"):
        for _ in range(2):
            _, _, failed = module.rewards(batch, rollout, rollout.completion_mask)
    assert failed["tests.test_reliability:failing_reward"] == 2
    warned = [r.getMessage() for r in caplog.records if r.name == "ktr.module"]
    assert len(warned) == 1 and "'tests.test_reliability:failing_reward' raised (KeyError" in warned[0]


# ---------------------------------------------------------------------------------- 6. counts that survive
class _OddFramesFail(SyntheticDataModule):
    """The synthetic task where every item with an odd index has an undecodable video."""

    def load_media(self, row: dict):
        from ktr.data.video import MediaDecodeError

        if int(row["problem_id"].split("-")[-1]) % 2:
            raise MediaDecodeError(row["path"], "test: odd item")
        return super().load_media(row)


@pytest.mark.slow
def test_skip_counts_survive_resume(tmp_path) -> None:
    def fit(steps: int, ckpt: str | None = None):
        L.seed_everything(0)
        module = _module(loss=LossConfig(beta=0.0))
        dm = _OddFramesFail(batch_size=2, val_size=0, train_size=8, video=SMALL_VIDEO, shuffle=False,
                            max_skip_fraction=0.5)
        trainer = _trainer(steps)
        trainer.fit(module, dm, ckpt_path=ckpt)
        return trainer, module._skips

    trainer, first = fit(1)
    trainer.save_checkpoint(tmp_path / "one.ckpt")
    _, resumed = fit(2, str(tmp_path / "one.ckpt"))
    assert (first.seen, first.by_reason["MediaDecodeError"]) == (2, 1)
    assert (resumed.seen, resumed.by_reason["MediaDecodeError"]) == (4, 2)  # continued, not restarted
    assert [e.path for e in resumed.examples] == ["synthetic://0/1", "synthetic://0/3"]


def test_skip_message_gives_the_row_in_the_file_and_duplicates_are_reported(tmp_path, caplog) -> None:
    f = tmp_path / "train.json"
    rows = [dict(ROW, solution="no tag"), dict(ROW, problem_type="essay"), ROW, dict(ROW, problem="Other?")]
    f.write_text(json.dumps(rows))
    with caplog.at_level(logging.WARNING):
        dm = VideoR1DataModule(train_file=str(f), max_skip_fraction=0.6)
        kept = dm.train_rows()
    assert any("1 problem_ids occur more than once (2 rows), e.g. \"q1\" at rows 2, 3" in r.getMessage()
               for r in caplog.records)
    metrics = dm.load_metrics()
    assert metrics["data/invalid_rows"] == 2 and metrics["data/duplicate_problem_ids"] == 1
    assert metrics["data/invalid/field_solution"] == 1
    skipped = PromptDataset(kept, dm.load_media, processor=None)[0]  # media missing: skipped before the processor
    assert skipped.index == 0 and skipped.where == f"{f} row 2"
    counter = SkipCounter(max_fraction=1.0)
    with caplog.at_level(logging.WARNING, logger="ktr.data.skips"):
        counter.update(1, [skipped])
    assert f"skipping {f} row 2 (./missing.mp4)" in caplog.records[-1].getMessage()


# ---------------------------------------------------------------------------------- 7. warts
def test_console_gives_no_args_both_ways_warning(monkeypatch, capsys) -> None:
    from ktr.cli import console

    monkeypatch.setattr(sys, "argv", ["ktr", "fit", "--config", DEMO, "--print_config"])
    with warnings.catch_warnings(record=True) as caught, pytest.raises(SystemExit) as exit_info:
        warnings.simplefilter("always")
        console()
    assert exit_info.value.code == 0 and "class_path" in capsys.readouterr().out
    assert not [w for w in caught if "args parameter" in str(w.message)]


@pytest.mark.usefixtures("_argv")
def test_help_describes_ktr(capsys) -> None:
    from ktr.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "usage: ktr" in out and "Video-KTR" in out and "Lightning Trainer command line tool" not in out


@pytest.mark.slow
def test_bench_step_times_rl_steps_on_the_demo_config() -> None:
    import ktr.experiments.bench_step as bench
    from ktr.model.trained import read_configs

    config = read_configs([DEMO])
    assert config["model"]["init_args"]["warm_start_steps"] > 0  # the demo warms up with SFT
    module = bench.build_module(config, None, torch.device("cpu"), {})
    assert module.warm_start_steps == 0 and not module.needs_targets


def _agree_worker(rank: int, port: int, out: str) -> None:
    from types import SimpleNamespace

    import torch.distributed as dist

    from ktr.data.base import StepBatch
    from ktr.data.skips import Skipped
    from ktr.training.base import _agree_on_step

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        rows = [{"path": f"./r{rank}.mp4"}]
        empty = StepBatch(None, [Skipped(0, "./bad.mp4", "MediaDecodeError: x")])
        full = StepBatch(SimpleNamespace(rows=rows), [])
        first = _agree_on_step(empty if rank == 0 else full, torch.device("cpu"))  # rank 0 has nothing
        second = _agree_on_step(full, torch.device("cpu"))  # both have prompts
        Path(out, f"{rank}.json").write_text(json.dumps({
            "first": [first.prompts is None, [s.kind for s in first.skipped]],
            "second": [second.prompts is None, len(second.skipped)]}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes importing Lightning: ~10-80 s depending on the machine's load
def test_ranks_skip_a_step_together_when_one_has_no_prompt(tmp_path) -> None:
    """A rank left without prompts used to return early while the others waited in their collectives (hang)."""
    import torch.multiprocessing as mp

    port = free_port()
    mp.start_processes(_agree_worker, args=(port, str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    r0, r1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    assert r0["first"] == [True, ["MediaDecodeError"]]
    assert r1["first"] == [True, ["PeerRankEmpty"]]  # its prompt is counted as skipped, not silently lost
    assert r0["second"] == r1["second"] == [False, 0]

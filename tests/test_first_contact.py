"""Runs that look fine but train nothing, answers that cannot be right, lost checkpoints (issue 29).

1. `sampling.group_size: 1` is refused where the RL module is built (every group-relative advantage would be 0);
   generation alone still samples one completion.
2. A benchmark row whose answer is not among its options is left out and counted in `excluded`; an output cut
   off before any letter counts as unparsable (scored as released).
3. A skip limit that trips at the end of an epoch saves `last.ckpt` first; a media path that is a directory is
   reported as one.
4. `--ckpt_path last` resumes from the newest `last.ckpt` of the run's earlier versions, or ends naming where
   it looked.
5. A batch size larger than the training set is warned about, naming the requested and the effective batch.
6. Resuming with another model size names the differing settings in one line, not PyTorch's `size mismatch` dump.
7. Checkpoints are written through a temporary file in their own folder, removed when the save fails.
8. `ktr test --ckpt_path` does not warn that the training callbacks must be re-added; the progress bar of a
   `max_steps` run reads `Epoch 0`, not `Epoch 0/-2` (help and parse errors: tests/test_cli.py).
9. One `eval_root` places all five benchmarks; an absolute path of one benchmark is kept.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from ktr.config import (
    ConfigError,
    LossConfig,
    PolicyConfig,
    SamplingConfig,
    check_rollout_settings,
)

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")


# ---------------------------------------------------------------------------------- 1. group_size 1
@pytest.mark.parametrize("advantage", ["grpo", "drgrpo"])
def test_group_size_one_is_refused_for_training(advantage) -> None:
    with pytest.raises(ConfigError, match=r"sampling.group_size must be >= 2 for RL training, got 1: "
                                          rf"loss.advantage '{advantage}' is relative"):
        check_rollout_settings(PolicyConfig(), SamplingConfig(group_size=1), LossConfig(advantage=advantage))
    check_rollout_settings(PolicyConfig(), SamplingConfig(group_size=2), LossConfig(advantage=advantage))
    assert SamplingConfig(group_size=1).group_size == 1  # generation alone (validation, explain) keeps G = 1


def test_cli_refuses_group_size_one_in_one_line(monkeypatch, capsys) -> None:
    from ktr.cli import main

    monkeypatch.setattr(sys, "argv", ["ktr"])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", DEMO, "--model.init_args.sampling.group_size=1", "--trainer.max_steps=0"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "ktr: error: invalid setting: sampling.group_size must be >= 2 for RL training, got 1" in err
    assert "Traceback" not in err


def test_every_shipped_config_trains_with_a_group() -> None:
    """`--print_config` (tests/test_cli.py) stops before the module is built: check the construction-time rule."""
    import yaml

    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        init = ((yaml.safe_load(path.read_text()) or {}).get("model") or {}).get("init_args") or {}
        group = (init.get("sampling") or {}).get("group_size", SamplingConfig.group_size)
        advantage = (init.get("loss") or {}).get("advantage", "grpo")
        check_rollout_settings(PolicyConfig(), SamplingConfig(group_size=group), LossConfig(advantage=advantage))


# ---------------------------------------------------------------------------------- 2. benchmark answers
MMVU_ROW = {"problem_id": 1, "problem": "How many grams?", "data_type": "video", "problem_type": "multiple choice",
            "options": ["A. 10.0", "B. 5.0", "C. 12.0", "D. 15.0", "E. 20.0"], "solution": "<answer>A</answer>",
            "path": "./Evaluation/MMVU/videos/Chemistry/0.mp4"}


def _mmvu(tmp_path, rows):
    from ktr.eval import get_benchmark

    f = tmp_path / "mmvu.json"
    f.write_text(json.dumps(rows))
    bench = get_benchmark("mmvu")(f, str(tmp_path), "video_r1")
    return bench, bench.load()


def test_answer_not_among_the_options_is_excluded_and_counted(tmp_path, caplog) -> None:
    from ktr.eval import summarize

    rows = [MMVU_ROW, dict(MMVU_ROW, problem_id=2, solution="<answer>Z</answer>")]
    bench, items = _mmvu(tmp_path, rows)
    assert [it.qid for it in items] == ["1"]
    assert "mmvu.json: row 1: field 'solution': answer 'Z' is not among the options" in caplog.text
    results = summarize([bench.evaluate("<answer>A</answer>", items[0])], bench.excluded)
    assert results["excluded"] == {"answer not among the options": 1}
    assert (results["n_scored"], results["overall"]) == (1, 1.0)
    assert bench.settings()["excluded"] == {"answer not among the options": 1}


def test_output_cut_off_before_any_letter_is_unparsable_scored_as_released(tmp_path) -> None:
    from ktr.eval import summarize

    bench, items = _mmvu(tmp_path, [dict(MMVU_ROW, problem_id=i) for i in range(5)])
    outputs = ["<think>the mass is 10 g</think><answer>", "<think>so", "<answer>A</answer>", "A", "<answer>C.</answer>"]
    records = [bench.evaluate(out, it) for out, it in zip(outputs, items)]
    assert [r["parsed"] for r in records] == [False, False, True, True, True]
    assert [r["step"] for r in records] == ["whole_output", "whole_output", "answer_tag", "whole_output", "answer_tag"]
    assert [r["score"] for r in records] == [0.0, 0.0, 1.0, 1.0, 0.0]  # Video-R1's exact match: "C." is wrong
    results = summarize(records)
    assert (results["n_unparsable"], results["overall"], results["overall_answered"]) == (2, 2 / 5, 2 / 3)


# ---------------------------------------------------------------------------------- 3. skip limit, checkpoint
def _skip_run(tmp_path, train_size: int, min_seen: int, max_fraction: float, steps: int = -1):
    """A KTR fit on synthetic items whose 1st-3rd are 204 tokens (> max_prompt_length 200: skipped)."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from ktr.data.base import SyntheticDataModule
    from ktr.module import KTRModule
    from tests.helpers import SMALL_VIDEO

    L.seed_everything(0)
    torch.set_num_threads(1)
    module = KTRModule(policy=PolicyConfig(attn_implementation="eager"), loss=LossConfig(beta=0.0),
                       sampling=SamplingConfig(group_size=2, max_new_tokens=4, top_p=1.0, max_prompt_length=200))
    dm = SyntheticDataModule(batch_size=2, val_size=0, train_size=train_size, video=SMALL_VIDEO, shuffle=False,
                             max_skip_fraction=max_fraction, skip_min_seen=min_seen)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=0, save_last=True)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, max_steps=steps, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, logger=False, callbacks=[ckpt])
    return module, dm, trainer


@pytest.mark.parametrize("where", ["epoch_end", "mid_epoch"])
@pytest.mark.slow
def test_skip_limit_saves_last_checkpoint_before_stopping(tmp_path, where) -> None:
    """3 of the first 4 items are skipped after one RL step on item 0. At the epoch end (4 items, skip_min_seen
    100 keeps the per-batch check quiet) the check ran before ModelCheckpoint's save: nothing was saved."""
    import torch

    from ktr.data.skips import SkipLimitExceeded

    size, min_seen = (4, 100) if where == "epoch_end" else (8, 4)
    module, dm, trainer = _skip_run(tmp_path, size, min_seen, 0.5)
    with pytest.raises(SkipLimitExceeded, match="3 of 4 samples"):
        trainer.fit(module, dm)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert saved["global_step"] == trainer.global_step == 1 and saved["ktr_skips"]
    if where == "mid_epoch":  # the save made inside the step resumes: the data fixed (limit raised), it goes on
        module, dm, trainer = _skip_run(tmp_path / "resumed", size, min_seen, 1.0, steps=2)
        trainer.fit(module, dm, ckpt_path=tmp_path / "last.ckpt")
        assert trainer.global_step == 2


@pytest.mark.parametrize("kind", ["video", "image"])
def test_media_path_that_is_a_directory_is_named_as_one(tmp_path, kind) -> None:
    from ktr.data.skips import Skipped
    from ktr.data.video import ImageSettings, VideoSettings, load_image, load_video

    folder = tmp_path / "clip.mp4"
    folder.mkdir()
    load = (lambda p: load_video(p, VideoSettings())) if kind == "video" else (lambda p: load_image(p, ImageSettings()))
    with pytest.raises(IsADirectoryError, match=f"{kind} path is a directory, not a file: '.*clip.mp4'") as err:
        load(str(folder))
    assert Skipped(0, "./clip.mp4", f"{type(err.value).__name__}: {err.value}").kind == "IsADirectoryError"


# ---------------------------------------------------------------------------------- 4. --ckpt_path last
def _demo_fit(tmp_path, monkeypatch, steps: int, *extra: str):
    import torch

    from ktr.cli import main

    monkeypatch.setattr(sys, "argv", ["ktr"])
    torch.set_num_threads(1)
    return main(["fit", "--config", DEMO, f"--trainer.max_steps={steps}", "--trainer.enable_progress_bar=false",
                 f"--trainer.logger.init_args.save_dir={tmp_path}", "--model.init_args.warm_start_steps=2",
                 "--data.init_args.batch_size=1", "--trainer.val_check_interval=null",
                 "--trainer.limit_val_batches=0", *extra])


@pytest.mark.slow
def test_ckpt_path_last_resumes_the_runs_last_checkpoint(tmp_path, monkeypatch, capsys) -> None:
    first = _demo_fit(tmp_path, monkeypatch, 1)
    last = Path(first.trainer.checkpoint_callback.last_model_path)
    assert last.parent.parent.name == "version_0" and last.name == "last.ckpt"
    second = _demo_fit(tmp_path, monkeypatch, 2, "--ckpt_path=last")
    assert Path(second.trainer.log_dir).name == "version_1"  # the new version folder has no checkpoint ...
    assert second.trainer.ckpt_path == str(last)  # ... yet the run resumed from version_0's
    assert second.trainer.global_step == 2
    assert f"ktr: --ckpt_path last is {last}" in capsys.readouterr().err


@pytest.mark.slow
def test_ckpt_path_last_without_a_checkpoint_is_refused(tmp_path, monkeypatch, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _demo_fit(tmp_path, monkeypatch, 1, "--ckpt_path=last")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert (f"ktr: error: --ckpt_path last: no last.ckpt in {tmp_path / 'demo' / '*' / 'checkpoints'}; give the "
            "checkpoint's path, or set save_last: true") in err


# ---------------------------------------------------------------------------------- 5. batch larger than the data
def test_batch_size_above_the_row_count_warns_with_both_numbers(tmp_path, caplog) -> None:
    import logging

    from ktr.data.videor1 import VideoR1DataModule

    rows = [dict(MMVU_ROW, problem_id=f"q{i}", path=f"./v{i}.mp4", data_source="x") for i in range(8)]
    f = tmp_path / "train.json"
    f.write_text(json.dumps(rows))
    with caplog.at_level(logging.WARNING, logger="ktr.data.base"):
        VideoR1DataModule(train_file=str(f), batch_size=64).train_dataloader()
        assert ("data.batch_size is 64 but the training set has 8 row(s): each step trains on 8 prompt(s) per "
                "device, not 64") in caplog.text
        caplog.clear()
        VideoR1DataModule(train_file=str(f), batch_size=8).train_dataloader()
    assert not [r for r in caplog.records if r.name == "ktr.data.base"]


# ---------------------------------------------------------------------------------- 6. resume with another size
@pytest.mark.slow
def test_resume_with_another_model_size_names_the_setting(tmp_path) -> None:
    import lightning as L
    import torch

    from ktr.model.checkpoint import CheckpointError
    from ktr.config import TinyModelConfig
    from ktr.data.base import SyntheticDataModule
    from ktr.module import KTRModule
    from tests.helpers import SMALL_VIDEO

    def run(intermediate: int):
        torch.set_num_threads(1)
        policy = PolicyConfig(attn_implementation="eager", tiny=TinyModelConfig(intermediate_size=intermediate))
        module = KTRModule(policy=policy, warm_start_steps=1, loss=LossConfig(beta=0.0))
        dm = SyntheticDataModule(batch_size=1, val_size=0, train_size=2, video=SMALL_VIDEO, shuffle=False)
        trainer = L.Trainer(accelerator="cpu", max_steps=1, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, logger=False, enable_checkpointing=False)
        return module, dm, trainer

    module, dm, trainer = run(128)
    trainer.fit(module, dm)
    trainer.save_checkpoint(tmp_path / "small.ckpt")
    module, dm, trainer = run(192)
    with pytest.raises(CheckpointError) as err:
        trainer.fit(module, dm, ckpt_path=tmp_path / "small.ckpt")
    msg = str(err.value)
    assert msg.startswith("the checkpoint is of another model: policy.tiny.intermediate_size: 128 in the checkpoint, "
                          "192 here (")
    assert "\n" not in msg and "tensor(s) differ in shape" in msg


def test_shape_mismatch_without_stored_settings_names_a_tensor() -> None:
    import torch

    from ktr.model.checkpoint import shape_mismatch

    own = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
    assert shape_mismatch({"w": torch.zeros(2, 3)}, own, None, {}) is None
    assert shape_mismatch({"w": torch.zeros(4, 3), "b": torch.zeros(3)}, own, None, {}) == (
        "the checkpoint is of another model: 1 tensor(s) differ in shape, e.g. w: [4, 3] in the checkpoint, [2, 3] "
        "here; use the policy settings it was trained with")


# ---------------------------------------------------------------------------------- 7. temporary checkpoint files
class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


@pytest.mark.slow
def test_checkpoint_temp_file_stays_in_the_run_folder_and_goes_on_failure(tmp_path, monkeypatch) -> None:
    """The system temp directory is unusable here (as when it is full or small): a save still works, since its
    temporary file is in the checkpoint's own folder; a failing save leaves the old file and no temporary one."""
    import tempfile

    import torch

    from ktr.training.checkpoint_io import RunFolderCheckpointIO

    module, dm, trainer = _skip_run(tmp_path / "run", 2, 100, 1.0, steps=1)
    trainer.fit(module, dm)
    assert isinstance(trainer.strategy.checkpoint_io, RunFolderCheckpointIO)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-tmp"))
    target = tmp_path / "run" / "manual.ckpt"
    trainer.save_checkpoint(target)
    assert torch.load(target, weights_only=False)["global_step"] == 1
    before = target.read_bytes()
    with pytest.raises(RuntimeError, match="cannot pickle this"):
        trainer.strategy.checkpoint_io.save_checkpoint({"state_dict": {}, "bad": _Unpicklable()}, target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt", "manual.ckpt"]


# ---------------------------------------------------------------------------------- 8. evaluation run messages
def test_test_with_a_fit_checkpoint_does_not_warn_about_training_callbacks(tmp_path, monkeypatch) -> None:
    """The checkpoint holds ModelCheckpoint's and KeyTokenReport's states; an evaluation needs neither, so
    Lightning's "callbacks used to create the checkpoint need to be provided" would be a false alarm."""
    import warnings

    import torch
    import yaml

    from ktr.cli import main

    first = _demo_fit(tmp_path, monkeypatch, 1)
    last = Path(first.trainer.checkpoint_callback.last_model_path)
    held = set(torch.load(last, weights_only=False)["callbacks"])
    assert any(k.startswith("ModelCheckpoint") for k in held)
    config = yaml.safe_load((ROOT / "configs" / "demo_eval.yaml").read_text())
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "eval")
    bench = config["trainer"]["callbacks"][0]["init_args"]
    bench.update(num_questions=2, data_dir=str(tmp_path / "bench"))
    bench["decoding"]["max_new_tokens"] = 2
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(config))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = main(["test", "--config", str(tmp_path / "eval.yaml"), "--ckpt_path", str(last),
                    "--trainer.enable_progress_bar=false"])
    assert cli.trainer.ckpt_path == str(last)
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "callbacks used to create the checkpoint" in m], messages


def test_progress_bar_of_a_max_steps_run_reads_the_epoch_alone(monkeypatch) -> None:
    from lightning.pytorch.callbacks import RichProgressBar

    from ktr.cli import main
    from ktr.training.lightning_compat import StepsProgressBar

    monkeypatch.setattr(sys, "argv", ["ktr"])
    cli = main(["--config", DEMO, "--trainer.logger=false"], run=False)  # max_steps 150, no max_epochs
    bar = cli.trainer.progress_bar_callback
    assert type(bar) is StepsProgressBar
    cli.trainer.fit_loop.max_epochs = -1  # what Lightning sets when such a fit starts
    bar.setup(cli.trainer, cli.model, "fit")
    assert bar._get_train_description(0).strip() == "Epoch 0"
    stock = RichProgressBar()
    stock.setup(cli.trainer, cli.model, "fit")
    assert stock._get_train_description(0).strip() == "Epoch 0/-2"  # what Lightning's own bar prints
    off = main(["--config", DEMO, "--trainer.logger=false", "--trainer.enable_progress_bar=false"], run=False)
    assert off.trainer.progress_bar_callback is None


# ---------------------------------------------------------------------------------- 9. one evaluation root
class _Parsed(Exception):
    pass


def test_eval_root_set_once_places_all_five_benchmarks(tmp_path, monkeypatch) -> None:
    from ktr.cli import KTRCLI, main

    seen = {}

    def stop(self) -> None:  # the config as it would be instantiated, without building the 7B model
        seen["config"] = self.config
        raise _Parsed

    monkeypatch.setattr(sys, "argv", ["ktr"])
    monkeypatch.setattr(KTRCLI, "instantiate_classes", stop)
    root = tmp_path / "Evaluation"
    with pytest.raises(_Parsed):
        main(["test", "--config", str(ROOT / "configs" / "eval.yaml"), "--eval_root", str(root)])
    callbacks = seen["config"]["test"]["trainer"]["callbacks"]
    paths = {cb["class_path"].rsplit(".", 1)[1]: cb["init_args"] for cb in callbacks}
    assert sorted(paths) == ["MMVU", "TempCompass", "VideoHolmes", "VideoMME", "VideoMMMU"]
    for name, init in paths.items():
        assert Path(init["annotation_path"]).parent == root, (name, init["annotation_path"])
        assert Path(init["annotation_path"]).is_absolute()
        want = root / "VideoHolmes" if name == "VideoHolmes" else root
        assert Path(init["video_root"]) == want, name


def test_eval_root_keeps_absolute_paths_and_leaves_other_callbacks() -> None:
    from ktr.cli import resolve_eval_root

    callbacks = [{"class_path": "ktr.callbacks.MMVU", "init_args": {"annotation_path": "/elsewhere/mmvu.json",
                                                                     "video_root": "/videos/mmvu"}},
                 {"class_path": "ktr.callbacks.TempCompass",
                  "init_args": {"annotation_path": "TempCompass", "video_root": "TempCompass/videos",
                                "meta_info_path": "TempCompass/meta_info.json"}},
                 {"class_path": "ktr.callbacks.KeyTokenReport", "init_args": {"output_dir": "reports"}}]
    resolve_eval_root(callbacks, "/data/Evaluation")
    assert callbacks[0]["init_args"] == {"annotation_path": "/elsewhere/mmvu.json", "video_root": "/videos/mmvu"}
    assert callbacks[1]["init_args"] == {"annotation_path": "/data/Evaluation/TempCompass",
                                         "video_root": "/data/Evaluation/TempCompass/videos",
                                         "meta_info_path": "/data/Evaluation/TempCompass/meta_info.json"}
    assert callbacks[2]["init_args"] == {"output_dir": "reports"}

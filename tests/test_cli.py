"""The `ktr` CLI: every shipped config parses; bad keys fail at parse time; `fit` runs in-process."""

import sys
from pathlib import Path

import pytest

from ktr.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["ktr"])


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
@pytest.mark.slow
def test_config_parses(config: Path, capsys) -> None:
    sub = "test" if "eval" in config.name else "fit"
    with pytest.raises(SystemExit) as exit_info:
        main([sub, "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    assert "class_path" in capsys.readouterr().out


def test_unknown_key_fails_naming_it(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs/demo.yaml"), "--model.init_args.loss.nope=1"])
    assert exit_info.value.code != 0
    assert "nope" in capsys.readouterr().err


def test_bad_enum_fails_naming_key(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(ROOT / "configs/demo.yaml"),
              "--model.init_args.loss.aggregation=token-sum"])
    assert "aggregation" in capsys.readouterr().err


@pytest.mark.slow
def test_help_documents_options(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", "ktr.module.KTRModule"])
    out = capsys.readouterr().out
    assert "--model.key_tokens.temporal_perturbation" in out
    assert "Completions per prompt" in out  # attribute docstring of SamplingConfig.group_size


@pytest.mark.slow
def test_fit_runs_in_process_and_logs_rewards(tmp_path: Path) -> None:
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.set_num_threads(1)
    main(["fit", "--config", str(ROOT / "configs/demo.yaml"), "--trainer.max_steps=2",
          "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={tmp_path}",
          "--model.init_args.warm_start_steps=1", "--model.init_args.sampling.group_size=2",
          "--model.init_args.sampling.max_new_tokens=6", "--data.init_args.batch_size=1",
          "--trainer.val_check_interval=null", "--trainer.limit_val_batches=0", "--trainer.log_every_n_steps=1"])
    events = list(tmp_path.rglob("events.out.tfevents*"))
    assert events
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ["train/reward/total", "train/reward/accuracy", "train/reward/format", "train/kl", "train/loss",
                "train/grad_norm", "train/completion_length", "train/ktr/frac_key", "train/sft_loss"]:
        assert tag in tags, (tag, sorted(tags))

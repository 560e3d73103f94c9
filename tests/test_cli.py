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


# ---------------------------------------------------------------------------------- help and messages (issue 29)
def test_top_help_lists_ktrs_commands_with_whole_descriptions(capsys) -> None:
    """`ktr --help` lists fit, validate, test and explain (not Lightning's predict, which ktr's modules cannot run),
    each with ktr's own one-line description, not a docstring line cut mid-sentence."""
    from ktr.cli import COMMANDS

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    flat = " ".join(out.split())
    assert "{fit,validate,test,explain}" in out and "predict" not in out
    for name, text in COMMANDS.items():
        assert f"{name} {text}" in flat, name
    assert "make sure you never run on your" not in flat  # Lightning's cut `test` line


def test_fit_help_opens_with_ktrs_own_options(capsys, monkeypatch) -> None:
    """On an 80-column terminal: the usage is one line, the first screen is ktr's options (the model and data
    classes, where every option is documented, the option groups), Lightning's Trainer options come after."""
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines[0]) < 130 and lines[0].startswith("usage: ktr fit")  # not 50 lines of [--trainer.X X]
    assert "ktr fit --model.help ktr.module.KTRModule" in "\n".join(lines[:12])
    first = "\n".join(lines[:30])
    for text in ["ktr's options:", "--model CLASS", "ktr.module.KTRModule", "ktr.training.sft.SFTModule",
                 "--data CLASS", "ktr.data.videor1.Holmes16kDataModule", "--ckpt_path"]:
        assert text in first, text
    screen = "\n".join(lines[:50])
    assert "--trainer.accelerator" not in screen and "--eval_root" in screen
    assert "Option groups of ktr.module.KTRModule" in screen and "key_tokens" in screen and "sampling" in screen


@pytest.mark.parametrize("args, line, hint", [
    (["--model.init_args.loss.nope=1"], "unknown option model.init_args.loss.nope",
     "ktr fit --model.help ktr.module.KTRModule"),
    (["--model.init_args.loss.aggregation=token-sum"],
     "model.init_args.loss.aggregation: expected one of 'seq-mean-token-mean', 'token-mean', "
     "'seq-mean-token-sum-norm', got token-sum", "ktr fit --model.help ktr.module.KTRModule"),
    (["--data.init_args.batch_size=abc"], "data.init_args.batch_size: expected int, got abc",
     "ktr fit --data.help ktr.data.base.SyntheticDataModule"),
    (["--trainer.max_stepz=1"], "unknown option trainer.max_stepz", "ktr fit --help"),
    (["--data", "ktr.data.videor1.Holmes16kDataModule"],
     "missing required option data.init_args.train_file (of ktr.data.videor1.Holmes16kDataModule)",
     "ktr fit --data.help ktr.data.videor1.Holmes16kDataModule"),
])
def test_parse_errors_are_one_line_naming_the_key(args, line, hint, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs/demo.yaml"), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2, err  # was ~50 lines of usage, then the union report with the whole data namespace
    assert err[0] == f"ktr: error: {line}"
    assert hint in err[1]


def test_condense_error_reads_jsonargparse_messages() -> None:
    from ktr.cli import condense_error

    nested = ("Parser key \"trainer.callbacks\":\n  Does not validate against any of the Union subtypes\n"
              "  Errors:\n    - Problem with given class_path 'ktr.callbacks.MMVU':\n"
              "        Option 'nope' is not accepted\n    - Not a valid subclass of Callback\n"
              "  Given value type: <class 'list'>\n  Given value: [{'class_path': 'ktr.callbacks.MMVU'}]")
    assert condense_error(nested, "ktr test") == (
        "unknown option trainer.callbacks[ktr.callbacks.MMVU].nope",
        "the options of ktr.callbacks.MMVU: ktr test --trainer.callbacks.help ktr.callbacks.MMVU")
    assert condense_error('Parser key "trainer.max_steps":\n  Expected a <class \'int\'>. Got value: x', "ktr fit") \
        == ("trainer.max_steps: expected int, got x", "the options: ktr fit --help")

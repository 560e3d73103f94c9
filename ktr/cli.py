"""The `ktr` command: a LightningCLI with `fit`, `validate`, `test`, `predict`, plus `ktr explain` (layer L4).

Every option of the module, the datamodule and the trainer is typed; attribute docstrings become `--help`
text; unknown keys and bad choices fail at parse time naming the key.
"""

from __future__ import annotations

import os
import sys

from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningCLI

set_parsing_settings(docstring_parse_attribute_docstrings=True)


DESCRIPTION = ("ktr: reinforcement learning of video LLMs (Qwen2.5-VL) with GRPO and Video-KTR key-token "
               "attribution. `ktr fit` trains, `ktr test` evaluates on benchmarks, `ktr validate` runs validation, "
               "`ktr explain` shows a checkpoint's key tokens; `ktr <command> --help` lists every option.")


class KTRCLI(LightningCLI):
    def parse_arguments(self, parser, args) -> None:
        """Parse, then check a given `--ckpt_path` before Lightning reads it (it names the file and the fault)."""
        super().parse_arguments(parser, args)
        from ktr.model.checkpoint import SPECIAL_CKPT_PATHS, CheckpointError, check_checkpoint

        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if ckpt and str(ckpt) not in SPECIAL_CKPT_PATHS and not str(ckpt).startswith(("registry:", "http")):
            try:
                check_checkpoint(ckpt, key="--ckpt_path")
            except CheckpointError as err:
                _fail(str(err))

    def instantiate_classes(self) -> None:
        """Build the objects; a setting rejected by its own validation ends with one line naming the key."""
        from ktr.config import ConfigError

        try:
            super().instantiate_classes()
        except Exception as err:  # jsonargparse wraps the error of the class it builds; find ours in the chain
            cause = _find(err, ConfigError)
            if cause is None:
                raise
            _fail(f"invalid setting: {cause}")

    def before_fit(self) -> None:
        """`--ckpt_path last` is the newest `last.ckpt` of the run's earlier versions, or the command ends.

        Lightning alone looks only in this run's new, empty version folder, warns and trains from scratch.
        Refusing when none is found (rather than starting afresh, as Lightning does so that `last` can be set
        before the first run) is a judgement call: a resume that silently restarts loses more than it saves.
        """
        from ktr.model.checkpoint import CheckpointError, check_checkpoint, find_last_checkpoint

        kwargs = self.config_init[self.subcommand]
        if kwargs.get("ckpt_path") != "last":
            return
        folders, where = _checkpoint_folders(self.trainer)
        found = find_last_checkpoint(folders)
        if found is None:
            looked = f"no last.ckpt in {', '.join(where)}" if where else "the trainer has no ModelCheckpoint callback"
            _fail(f"--ckpt_path last: {looked}; give the checkpoint's path, or set save_last: true on the "
                  "ModelCheckpoint callback of the run to resume")
        try:
            check_checkpoint(found, key="--ckpt_path last")
        except CheckpointError as err:
            _fail(str(err))
        print(f"ktr: --ckpt_path last is {found}", file=sys.stderr)
        kwargs["ckpt_path"] = str(found)

    before_validate = before_test = before_predict = before_fit

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"trainer.logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                                "init_args": {"save_dir": "runs", "name": "ktr"}}})


def main(args: list[str] | None = None, run: bool = True, callbacks: list | None = None) -> KTRCLI:
    """Entry point of the `ktr` console script; `args` for in-process use (tests, scripts), `callbacks` added to
    the config's own (e.g. a script's recorder)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from ktr.data.base import BaseDataModule
    from ktr.training.base import PolicyModule

    return KTRCLI(
        PolicyModule, BaseDataModule, subclass_mode_model=True, subclass_mode_data=True,
        args=args, run=run, save_config_kwargs={"overwrite": True},  # args None: Lightning reads sys.argv
        auto_configure_optimizers=False, parser_kwargs={"prog": "ktr", "description": DESCRIPTION},
        trainer_defaults={"callbacks": callbacks} if callbacks else None,
    )


def _checkpoint_folders(trainer) -> tuple[list, list[str]]:
    """Where this trainer's `ModelCheckpoint`s write, for every version of the run, and those places as the user
    would write them: an explicit `dirpath`, else `<save_dir>/<name>/*/checkpoints` of the first logger
    (`<default_root_dir>/checkpoints` without one)."""
    from pathlib import Path

    from lightning.pytorch.callbacks import ModelCheckpoint

    callbacks = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
    folders = [Path(cb.dirpath) for cb in callbacks if cb.dirpath is not None]
    where = [str(f) for f in folders]
    if any(cb.dirpath is None for cb in callbacks):
        logger = trainer.loggers[0] if trainer.loggers else None
        if logger is None or logger.save_dir is None:
            folders.append(Path(trainer.default_root_dir) / "checkpoints")
            where.append(str(folders[-1]))
        else:
            run = Path(logger.save_dir) / str(logger.name)
            folders += sorted(run.glob("*/checkpoints"))
            where.append(str(run / "*" / "checkpoints"))
    return folders, where


def _find(err: BaseException | None, kind: type) -> BaseException | None:
    """The first exception of type `kind` in `err`'s cause/context chain."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, kind):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _fail(message: str) -> None:
    """End the command like a parse error: one line on stderr, exit status 2."""
    print(f"ktr: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def console() -> None:
    """The `ktr` console script (returns nothing, so the exit status is 0 on success)."""
    if sys.argv[1:2] == ["explain"]:  # its own small parser (ktr.explain), not a LightningCLI subcommand
        from ktr.explain import main as explain

        explain(sys.argv[2:])
        return
    main()


if __name__ == "__main__":
    console()

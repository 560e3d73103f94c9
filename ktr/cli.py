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


class KTRCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"trainer.logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                                "init_args": {"save_dir": "runs", "name": "ktr"}}})


def main(args: list[str] | None = None, run: bool = True) -> KTRCLI:
    """Entry point of the `ktr` console script; `args` for in-process use (tests)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from ktr.data.base import BaseDataModule
    from ktr.policy_module import PolicyModule

    return KTRCLI(
        PolicyModule, BaseDataModule, subclass_mode_model=True, subclass_mode_data=True,
        args=args if args is not None else sys.argv[1:], run=run, save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


def console() -> None:
    """The `ktr` console script (returns nothing, so the exit status is 0 on success)."""
    if sys.argv[1:2] == ["explain"]:  # its own small parser (ktr.explain), not a LightningCLI subcommand
        from ktr.explain import main as explain

        explain(sys.argv[2:])
        return
    main()


if __name__ == "__main__":
    console()

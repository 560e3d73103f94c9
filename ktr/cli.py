"""The `ktr` command: a LightningCLI with `fit`, `validate`, `test`, plus `ktr explain` (layer L4).

Every option of the module, the datamodule and the trainer is typed; attribute docstrings become `--help`
text; unknown keys and bad choices fail at parse time in one line that names the key (`condense_error`).
`ktr <command> --help` opens with ktr's own options (`command_description`); Lightning's Trainer options
follow. `eval_root` is the one folder the benchmark callbacks' relative paths start from (`resolve_eval_root`).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import textwrap
import warnings
from contextlib import contextmanager
from typing import NoReturn

from jsonargparse import DefaultHelpFormatter, set_parsing_settings
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from ktr.training.lightning_compat import StepsProgressBar

set_parsing_settings(docstring_parse_attribute_docstrings=True)


DESCRIPTION = ("ktr: reinforcement learning of video LLMs (Qwen2.5-VL, Qwen3-VL) with GRPO and Video-KTR key-token "
               "attribution.\nStart with `ktr fit --config configs/demo.yaml`; `ktr <command> --help` shows a "
               "command's options.")

COMMANDS = {
    "fit": "train a policy: RL with Video-KTR key tokens (or GRPO, T-GRPO, TW-GRPO) or SFT, from a config",
    "validate": "run the validation loop once: the data module's validation set and any benchmark callbacks",
    "test": "evaluate a model or checkpoint on the benchmarks of a config (configs/eval.yaml)",
    "explain": "show which tokens of one answer depend on the video, on frame order, or are uncertain",
}
"""One line per command, as `ktr --help` lists them (`ktr explain` is dispatched by `console`, own parser)."""

INTROS = {
    "fit": ("Train a policy: RL with Video-KTR key tokens (or GRPO, T-GRPO, TW-GRPO) or SFT. Start from a config:\n"
            "  ktr fit --config configs/demo.yaml        (the CPU demo)\n"
            "  ktr fit --config configs/qwen7b.yaml --config configs/data/video_r1_holmes_16k.yaml\n"),
    "validate": ("Run the validation loop once with a model or checkpoint: the data module's validation set and any\n"
                 "benchmark callbacks of the config.\n"),
    "test": ("Evaluate a model or checkpoint on the benchmarks of a config (its evaluator callbacks):\n"
             "  ktr test --config configs/eval.yaml --eval_root DIR --model.init_args.policy.name_or_path MODEL\n"),
}

EVAL_PATH_KEYS = ("annotation_path", "video_root", "meta_info_path")
"""Init arguments of the benchmark callbacks that `eval_root` resolves (`resolve_eval_root`)."""

_DATA_HELP = "ktr.data.videor1.Holmes16kDataModule"


class KTRHelpFormatter(DefaultHelpFormatter):
    """jsonargparse's formatter, keeping the line breaks of descriptions (ktr's option list is laid out)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


class KTRArgumentParser(LightningArgumentParser):
    """LightningCLI's parser whose errors are one line naming the key and one line saying where to look,
    instead of the whole usage and jsonargparse's nested union report (`JSONARGPARSE_DEBUG=1` raises the
    full message instead)."""

    def parse_args(self, args=None, *rest, **kwargs):
        self.ktr_args = list(sys.argv[1:] if args is None else args)  # to name the command in an error's hint
        return super().parse_args(args, *rest, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        command = parser.prog.replace(" [options]", "")
        if command == "ktr":  # an error of the whole config, found after the command's parser returned
            given = [a for a in getattr(self, "ktr_args", []) if isinstance(a, str) and a in COMMANDS]
            command = f"ktr {given[0]}" if given else command
        text, hint = condense_error(message, command)
        sys.stderr.write(f"ktr: error: {text}\n  {hint}\n")
        self.exit(2)


class KTRCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """`fit`, `validate`, `test`. Lightning's `predict` is left out: ktr's modules have no predict step, so
        `ktr predict` could only fail (`Trainer.predict requires forward`)."""
        commands = dict(LightningCLI.subcommands())
        commands.pop("predict", None)
        return commands

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
        """Lightning's parsers, then ktr's one-line command list (with `explain`) in `ktr --help`."""
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        action = getattr(self.parser, "_subcommands_action", None)
        if action is None:
            return
        for choice in action._choices_actions:
            choice.help = COMMANDS.get(choice.dest, choice.help)
        if not any(c.dest == "explain" for c in action._choices_actions):
            action._choices_actions.append(argparse._SubParsersAction._ChoicesPseudoAction(
                "explain", (), COMMANDS["explain"]))
        action.metavar = "{" + ",".join(COMMANDS) + "}"

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

    def before_instantiate_classes(self) -> None:
        """`eval_root`, when set, is where the benchmark callbacks' relative paths start (`resolve_eval_root`)."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        root = config.get("eval_root")
        if root:
            resolve_eval_root(config.get("trainer.callbacks"), root)
        self.progress_bar_named = _names_a_progress_bar(config.get("trainer.callbacks"))

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

    def after_instantiate_classes(self) -> None:
        """Lightning's default progress bar -> `StepsProgressBar` (same bar, a label that reads right under
        `max_steps`); a progress bar the config names is left as it is."""
        trainer = getattr(self, "trainer", None)
        bar = getattr(trainer, "progress_bar_callback", None)
        if type(bar) is RichProgressBar and not getattr(self, "progress_bar_named", False):
            trainer.callbacks[trainer.callbacks.index(bar)] = StepsProgressBar()

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

    before_validate = before_test = before_fit

    def validate(self, **kwargs):
        """`Trainer.validate`, without Lightning's warning about the training callbacks (`_evaluation_run`)."""
        with _evaluation_run():
            return self.trainer.validate(**kwargs)

    def test(self, **kwargs):
        """`Trainer.test`, without Lightning's warning about the training callbacks (`_evaluation_run`)."""
        with _evaluation_run():
            return self.trainer.test(**kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"trainer.logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                                "init_args": {"save_dir": "runs", "name": "ktr"}}})
        parser.add_argument(
            "--eval_root", type=str | None, default=None,
            help="The folder of the benchmarks (README, 'Getting the data'): relative annotation_path, video_root "
                 "and meta_info_path of the benchmark callbacks start there, and a callback without video_root "
                 "reads its videos from it; absolute paths are kept (a per-benchmark override).")


@contextmanager
def _evaluation_run():
    """Silence one Lightning warning, in `ktr validate` / `ktr test` only.

    A checkpoint written by `ktr fit` holds the states of its training callbacks (ModelCheckpoint, key-token
    reports, ...). Restoring it in an evaluation run whose config lacks them, Lightning warns that "callbacks
    used to create the checkpoint need to be provided" and names them. Those states matter only to a training
    run that goes on (which checkpoints to keep, which step reported last); an evaluation reads the weights and
    nothing else, so the warning is false there. `ktr fit --ckpt_path` (resuming) keeps it.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Be aware that when using `ckpt_path`, callbacks used to create")
        yield


def _names_a_progress_bar(callbacks) -> bool:
    """Whether the parsed `trainer.callbacks` name a progress bar (then ktr leaves the bar as configured)."""
    import importlib

    from lightning.pytorch.callbacks import ProgressBar

    items = callbacks if isinstance(callbacks, list) else [callbacks] if callbacks is not None else []
    for cb in items:
        path = cb.get("class_path") if hasattr(cb, "get") else None
        module, _, name = str(path).rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError):
            continue
        if isinstance(cls, type) and issubclass(cls, ProgressBar):
            return True
    return False


def resolve_eval_root(callbacks, root: str) -> None:
    """Put the benchmark callbacks' relative paths under `root`, in place.

    `callbacks`: the parsed `trainer.callbacks` (a list of `{class_path, init_args}` namespaces or dicts, or one).
    A callback with an `annotation_path` init argument is a benchmark: its relative `annotation_path`,
    `video_root` and `meta_info_path` become `root/<path>`, a missing `video_root` becomes `root`, and absolute
    paths stay as they are, so one benchmark can still live elsewhere.
    """
    items = callbacks if isinstance(callbacks, list) else [callbacks] if callbacks is not None else []
    for cb in items:
        init = cb.get("init_args") if hasattr(cb, "get") else None
        if init is None or init.get("annotation_path") is None:
            continue
        if init.get("video_root") is None:
            init["video_root"] = str(root)
        for key in EVAL_PATH_KEYS:
            value = init.get(key)
            if value is not None and not os.path.isabs(os.path.expanduser(str(value))):
                init[key] = os.path.join(str(root), str(value))


def condense_error(message: str, command: str = "ktr") -> tuple[str, str]:
    """jsonargparse's error message -> (one line naming the full key, one line saying where the options are).

    jsonargparse reports a bad option of a `--model` / `--data` class as a union of every subtype it tried, with
    the whole given value; the fault is the innermost `Problem with given class_path` entry. Its key is put back
    together (`model.init_args.loss.nope`) and phrased as unknown option, missing option or bad value.
    """
    container, prefix, cls, text = _innermost(message.strip())
    first = next((line.strip() for line in text.splitlines() if line.strip()), text.strip())
    where = container or "the command line"
    if m := re.match(r"unrecognized arguments: (\S+)", first):
        out = f"unknown option {prefix}{m.group(1).lstrip('-').split('=')[0]}"
    elif m := re.match(r"Group '([\w.]+)' does not accept option '([\w.]+)'", first):
        out = f"unknown option {prefix}{m.group(1)}.{m.group(2)}"
    elif m := re.match(r"Option '([\w.]+)' is not accepted", first):
        out = f"unknown option {prefix}{m.group(1)}"
    elif m := re.match(r"Subcommand '\w+' does not accept option '([\w.]+)'", first):
        out = f"unknown option {m.group(1)}"
    elif m := re.match(r"the following arguments are required: (.+)", first):
        names = [prefix + n.strip() for n in m.group(1).split(",")]
        out = f"missing required option {', '.join(names)}" + (f" (of {cls})" if cls else "")
    elif prefix and not prefix.endswith("."):  # a leaf key: its value is wrong
        out = f"{prefix}: {_tidy(first)}"
    elif cls:
        out = f"{where}: {cls}: {_tidy(first)}"
    else:
        out = _tidy(first)
    if cls and re.search(r"No module named|not accessible|has no attribute|[Ii]mport", first):
        hint = f"the classes ktr offers: {command} --help"
    elif cls and container:
        hint = f"the options of {cls}: {command} --{container}.help {cls}"
    else:
        hint = f"the options: {command} --help"
    return out, hint


def _innermost(message: str, prefix: str = "", cls: str | None = None,
               container: str | None = None) -> tuple[str | None, str, str | None, str]:
    """(outermost key, key prefix or leaf key, innermost class path, innermost message) of a jsonargparse error."""
    m = re.match(r'Parser key "([^"]+)":\s*(.*)', message, re.S)
    if not m:
        return container, prefix, cls, message
    key, rest = m.group(1), m.group(2)
    container = container or key
    lines = rest.splitlines()
    for i, line in enumerate(lines):
        found = re.match(r"(\s*)- Problem with given class_path '([^']+)':\s*$", line)
        if not found:
            continue
        depth = len(found.group(1))
        block = []
        for nxt in lines[i + 1:]:
            if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= depth:
                break
            block.append(nxt)
        inner = textwrap.dedent("\n".join(block)).strip()
        listed = "Given value type: <class 'list'>" in rest
        sub = f"{prefix}{key}[{found.group(2)}]." if listed else f"{prefix}{key}.init_args."
        return _innermost(inner, sub, found.group(2), container)
    return container, prefix + key, cls, rest


def _tidy(text: str) -> str:
    """jsonargparse's value message, shorter: `<class 'int'>` -> int, Literal choices listed."""
    text = re.sub(r"<class '(?:\w+\.)*(\w+)'>", r"\1", text.strip())
    if m := re.match(r"Expected a typing\.Literal\[(.*)\]\. Got value: (.*)", text):
        return f"expected one of {m.group(1)}, got {m.group(2)}"
    if m := re.match(r"Expected a (.+?)\. Got value: (.*)", text):
        return f"expected {m.group(1)}, got {m.group(2)}"
    return text


def command_description(command: str) -> str:
    """The opening of `ktr <command> --help`: where every option is listed, ktr's own options, and the option
    groups of `KTRModule`. Classes and groups are read from the code (docstrings), never retyped."""
    import docstring_parser

    from ktr.module import KTRModule

    width = max(70, min(120, shutil.get_terminal_size((100, 24)).columns - 2))
    lines = [INTROS[command], "Every option with its type, default and meaning (Lightning's --trainer.KEY options "
                              "follow below):",
             f"  ktr {command} --model.help ktr.module.KTRModule", f"  ktr {command} --data.help {_DATA_HELP}",
             "ktr's options:"]

    def entry(name: str, text: str, indent: int = 22) -> None:
        lines.extend(textwrap.wrap(text, width, initial_indent=f"  {name:<{indent - 2}}",
                                   subsequent_indent=" " * indent) or [f"  {name}"])

    models, datas = _classes()
    entry("-c, --config FILE", "a YAML config (repeatable: later files and --KEY VALUE options override earlier "
                               "ones); --print_config shows the result and exits")
    for flag, role, classes in (("--model CLASS", "the training module", models),
                                ("--data CLASS", "the data module", datas)):
        entry(flag, f"{role}, one of:")
        for name, doc in classes:
            entry(f"  {name}", doc, indent=5 + max(len(n) for n, _ in models + datas))
    if command == "fit":
        entry("--ckpt_path PATH", "resume from a checkpoint; `last`: the newest last.ckpt of the run's earlier "
                                  "versions")
    else:
        entry("--ckpt_path PATH", "the Lightning checkpoint to evaluate (else the config's policy weights)")
    entry("--eval_root DIR", "the benchmarks' folder: relative paths of the benchmark callbacks start there")
    lines.append("Option groups of ktr.module.KTRModule (--model.init_args.GROUP.OPTION VALUE):")
    for param in docstring_parser.parse(KTRModule.__init__.__doc__ or "").params:
        entry(param.arg_name, _first_clause(param.description or ""))
    return "\n".join(lines) + "\n"


def _classes() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(class path, first clause of its docstring) of ktr's training modules and data modules."""
    import ktr.data.eval  # noqa: F401 (defines the classes listed)
    import ktr.data.videor1  # noqa: F401
    import ktr.module  # noqa: F401
    import ktr.training.sft  # noqa: F401
    from ktr.data.base import BaseDataModule
    from ktr.training.base import PolicyModule

    def walk(base: type) -> list[tuple[str, str]]:
        out = []
        for cls in base.__subclasses__():
            if cls.__module__.startswith("ktr."):
                out.append((f"{cls.__module__}.{cls.__qualname__}", _first_clause(cls.__doc__ or "")))
            out.extend(walk(cls))
        return out

    return walk(PolicyModule), walk(BaseDataModule)


def _first_clause(doc: str, shortest: int = 20) -> str:
    """The docstring's opening phrase: its first paragraph up to the first sentence end, colon, semicolon or
    parenthesis outside parentheses, once it is `shortest` characters long (a whole phrase, never cut inside)."""
    text = " ".join(doc.strip().split("\n\n")[0].split())
    depth = 0
    for i, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        if depth > 1 or (depth == 1 and ch != "(") or i < shortest:
            continue
        end = ch in ":;" or (ch == "(" and text[i - 1] == " ") or (
            ch == "." and text[i + 1:i + 2] in (" ", "") and not text[max(0, i - 3):i + 1].endswith(("e.g.", "i.e.")))
        if end:
            return text[:i].rstrip(" ,")
    return text.rstrip(".")


def _subcommand_kwargs() -> dict:
    """Per-command parser settings: a short usage line and ktr's options first (`command_description`)."""
    out = {}
    for command in ("fit", "validate", "test"):
        out[command] = {
            "usage": f"ktr {command} [-h] [-c CONFIG] [--print_config] [--model CLASS] [--data CLASS] "
                     f"[--KEY VALUE ...] [--ckpt_path PATH]",
            "description": command_description(command), "formatter_class": KTRHelpFormatter}
    return out


def main(args: list[str] | None = None, run: bool = True, callbacks: list | None = None) -> KTRCLI:
    """Entry point of the `ktr` console script; `args` for in-process use (tests, scripts), `callbacks` added to
    the config's own (e.g. a script's recorder)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from ktr.data.base import BaseDataModule
    from ktr.training.base import PolicyModule

    parser_kwargs = {"prog": "ktr", "description": DESCRIPTION, "formatter_class": KTRHelpFormatter}
    if run:
        parser_kwargs |= _subcommand_kwargs()
    return KTRCLI(
        PolicyModule, BaseDataModule, subclass_mode_model=True, subclass_mode_data=True,
        args=args, run=run, save_config_kwargs={"overwrite": True},  # args None: Lightning reads sys.argv
        auto_configure_optimizers=False, parser_kwargs=parser_kwargs, parser_class=KTRArgumentParser,
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


def end_process_group() -> None:
    """After a run that ended well on every rank: wait for all ranks, then take the process group down together.

    Lightning destroys an NCCL group at exit but leaves a gloo group (CPU runs) to each interpreter's teardown, in
    whatever order the ranks happen to exit; torch asks for an explicit `destroy_process_group` on every rank.
    Only called on success: a rank that failed never reaches the barrier, and the others must not wait on it.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def console() -> None:
    """The `ktr` console script (returns nothing, so the exit status is 0 on success)."""
    if sys.argv[1:2] == ["explain"]:  # its own small parser (ktr.explain), not a LightningCLI subcommand
        from ktr.explain import main as explain

        explain(sys.argv[2:])
        return
    main()
    end_process_group()


if __name__ == "__main__":
    console()

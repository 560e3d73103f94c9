"""Old import paths keep working through the one deprecation path (`ktr._moved`), each with a warning naming the
new path, and a config of an earlier run that names a moved class still parses."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from ktr import _moved

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_old_module_paths_import_the_new_modules_with_a_warning() -> None:
    """In a fresh interpreter (nothing imported yet), each old path warns once and is the new module."""
    code = ("import importlib, json, warnings\nfrom ktr import _moved\nout = {}\n"
            "for old, new in _moved.MODULES.items():\n"
            "    with warnings.catch_warnings(record=True) as caught:\n"
            "        warnings.simplefilter('always')\n"
            "        mod = importlib.import_module(old)\n"
            "    out[old] = [mod is importlib.import_module(new), [str(w.message) for w in caught]]\n"
            "print(json.dumps(out))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    import json

    got = json.loads(run.stdout.splitlines()[-1])
    assert set(got) == set(_moved.MODULES) and len(got) >= 17
    for old, (same, messages) in got.items():
        assert same, f"{old} did not import {_moved.MODULES[old]}"
        assert any(f"{old} moved to {_moved.MODULES[old]}" in m for m in messages), (old, messages)


@pytest.mark.parametrize(("old", "new"), sorted(_moved.CLASSES.items()))
def test_old_class_path_resolves_to_the_moved_class(old, new) -> None:
    module, _, name = old.rpartition(".")
    where, _, attr = new.rpartition(".")
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
        got = getattr(importlib.import_module(module), name)
    assert got is getattr(importlib.import_module(where), attr)


def test_every_new_path_exists_and_no_old_module_file_is_left() -> None:
    for new in _moved.MODULES.values():
        importlib.import_module(new)
    for old in _moved.MODULES:
        path = ROOT / (old.replace(".", "/") + ".py")
        assert not path.exists(), f"{path} is back: an old path must be an alias, not a second file"


def test_unknown_attribute_still_raises_attribute_error() -> None:
    import ktr.callbacks

    with pytest.raises(AttributeError):
        ktr.callbacks.NoSuchThing  # noqa: B018


@pytest.mark.slow
def test_a_saved_run_config_naming_a_moved_class_parses(tmp_path, capsys, monkeypatch) -> None:
    from ktr.cli import main

    monkeypatch.setattr(sys, "argv", ["ktr"])
    text = (ROOT / "configs" / "demo_eval.yaml").read_text()
    assert "ktr.data.eval.EvalDataModule" in text
    old = tmp_path / "old_eval.yaml"
    old.write_text(text.replace("ktr.data.eval.EvalDataModule", "ktr.callbacks.EvalDataModule"))
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "--config", str(old), "--print_config"])
    assert exit_info.value.code == 0
    assert "EvalDataModule" in capsys.readouterr().out

"""Every python example in the README runs."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks
    for code in blocks:
        exec(compile(code, str(README), "exec"), {})


def test_readme_starts_with_install_demo_and_test_commands() -> None:
    text = README.read_text()
    cmds = re.findall(r"```bash\n(.*?)```", text, re.S)
    assert "ktr fit --config configs/demo.yaml" in cmds[0]
    ci = next(line for line in reversed((README.parent / ".ci" / "run").read_text().strip().splitlines())
              if line.startswith("pytest"))  # the main suite (a later line runs the vLLM stage)
    assert cmds[1].strip() == f"HF_HUB_OFFLINE=1 {ci}" or ci in cmds[1]


def test_readme_and_ci_install_the_tested_set() -> None:
    first = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)[0]
    ci = (README.parent / ".ci" / "run").read_text()
    assert 'pip install -e ".[test,quant]" -c constraints.txt' in first
    assert 'pip install -q -e ".[test,quant]" -c constraints.txt' in ci
    torch_pin = re.search(r"^torch==(\S+)$", (README.parent / "constraints.txt").read_text(), re.M).group(1)
    assert f"pip install torch=={torch_pin}" in first and f"pip install -q torch=={torch_pin}" in ci


def test_readme_and_ci_pin_pip_and_the_build_backend() -> None:
    """pip's isolated build environments (ktr's editable build, rouge-score's sdist) ignore `-c`: the set reaches them
    only through `--build-constraint`, which needs pip >= 25.3, so pip itself is installed from the set first."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    root = README.parent
    first = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)[0]
    ci, ci_vllm = ((root / ".ci" / name).read_text() for name in ("run", "run_vllm"))
    assert first.index("pip install -U pip -c constraints.txt") < first.index("pip install -e")
    assert '-c constraints.txt --build-constraint constraints.txt' in first
    assert ci.index("pip install -q -U pip -c constraints.txt") < ci.index("pip install -q -e")
    assert '-e ".[test,quant]" -c constraints.txt --build-constraint constraints.txt' in ci
    assert "pip install -q -U pip -c constraints.txt" in ci_vllm and "--build-constraint constraints.txt" in ci_vllm
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", (root / "constraints.txt").read_text(), re.M))
    assert Version(pins["pip"]) >= Version("25.3")
    for line in tomllib.loads((root / "pyproject.toml").read_text())["build-system"]["requires"]:
        req = Requirement(line)
        assert req.name in pins and req.specifier.contains(pins[req.name]), f"build requirement {req} is not pinned"


def test_constraints_pin_every_dependency_inside_its_range() -> None:
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    root = README.parent
    pins = {canonicalize_name(n): v for n, v in
            re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", (root / "constraints.txt").read_text(), re.M)}
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    for line in project["dependencies"] + extras["test"] + extras["quant"]:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"pin {req.name}=={pins[name]} is outside {req}"


def test_requires_python_is_the_lowest_python_the_set_installs_on() -> None:
    """A floor below the tested set's makes pip fail with "ResolutionImpossible" instead of naming the Python:
    `scripts/check_platforms.py` resolved the set on the floor (every platform) and failed on the version below it."""
    import json
    import tomllib

    root = README.parent
    floor = tomllib.loads((root / "pyproject.toml").read_text())["project"]["requires-python"]
    checked = json.loads((root / "docs" / "platforms.json").read_text())
    assert floor == f">={checked['requires_python_floor']['floor']}", "rerun scripts/check_platforms.py --json"
    assert not checked["requires_python_floor"]["below_resolves"]
    lowest = min(checked["results"], key=lambda r: tuple(map(int, r["python"].split("."))))["python"]
    assert floor == f">={lowest}" and all(r["ok"] for r in checked["results"])
    assert f"Python {lowest}" in README.read_text().split("```")[0]


def test_readme_help_commands_show_ktrs_options(monkeypatch, capsys) -> None:
    """(issue 29) Every `ktr <command> ... help` the README gives prints ktr's own options (its former
    `ktr fit --model ktr.module.KTRModule --help` printed Lightning's Trainer options only)."""
    import shlex
    import sys

    import pytest

    from ktr.cli import main

    commands = re.findall(r"`(ktr (?:fit|validate|test)\b[^`]*?(?:--help|\.help)[^`]*)`", README.read_text())
    assert "ktr fit --model.help ktr.module.KTRModule" in commands
    monkeypatch.setattr(sys, "argv", ["ktr"])
    for command in commands:
        with pytest.raises(SystemExit) as exit_info:
            main(shlex.split(command)[1:])
        assert exit_info.value.code == 0, command
        assert "key_tokens" in capsys.readouterr().out, command


def test_readme_data_section_says_where_each_configured_file_comes_from() -> None:
    """(issue 29) The README's data section names every file the data configs and the evaluation config point
    at, the config key that points there, and the source it comes from."""
    import yaml

    text = README.read_text()
    section = text[text.index("### Getting the data"):]
    section = section[:section.index("\n### ", 1)]
    for path in sorted((README.parent / "configs" / "data").glob("*.yaml")):
        init = yaml.safe_load(path.read_text())["data"]["init_args"]
        assert path.name in section and Path(init["train_file"]).name in section, path.name
    assert "media_root" in section and "train_file" in section and "Video-R1/Video-R1-data" in section
    evaluation = yaml.safe_load((README.parent / "configs" / "eval.yaml").read_text())
    assert "eval_root" in evaluation and "eval_root" in section
    for cb in evaluation["trainer"]["callbacks"]:
        assert cb["init_args"]["annotation_path"] in section, cb["class_path"]
    for repo in ["lmms-lab/Video-MME", "lmms-lab/TempCompass", "lmms-lab/VideoMMMU", "yale-nlp/MMVU",
                 "TencentARC/Video-Holmes", "Video-R1/Video-R1-eval", "ziyue1999/Video-KTR"]:
        assert repo in section, repo

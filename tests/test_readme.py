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

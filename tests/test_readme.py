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

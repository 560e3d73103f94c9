"""Layering (STYLE.md): nothing in L0-L2 imports lightning; the drop-in API imports without it."""

import subprocess
import sys

L0_L2 = ["ktr._imports", "ktr.types", "ktr.ops", "ktr.advantages", "ktr.losses", "ktr.fused", "ktr.answers",
         "ktr.rewards", "ktr.probes.select", "ktr.probes.visual", "ktr.probes.temporal", "ktr.probes.keytokens",
         "ktr.policy", "ktr.forward", "ktr.rollout", "ktr.tokenizer", "ktr.data.video", "ktr.data.patches",
         "ktr.data.processor", "ktr.data.prompts", "ktr.data.synthetic", "ktr.eval"]


def test_lower_layers_do_not_import_lightning() -> None:
    code = ("import sys\n" + "".join(f"import {m}\n" for m in L0_L2) +
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning'))\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_every_module_imports() -> None:
    import importlib
    import pkgutil

    import ktr

    for info in pkgutil.walk_packages(ktr.__path__, "ktr."):
        if info.name != "ktr.__main__":
            importlib.import_module(info.name)

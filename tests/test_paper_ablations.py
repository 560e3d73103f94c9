"""scripts/paper_ablations.py (`ktr.experiments.paper_ablations`) writes one valid overlay per variant of each
paper figure."""

import sys
from pathlib import Path

import pytest
import yaml

import ktr.experiments.paper_ablations as pa
from ktr.cli import main
from ktr.config import KeyTokenConfig, LossConfig, SignalConfig
from ktr.training.algorithms import get_algorithm

ROOT = Path(__file__).resolve().parents[1]


def _key_tokens(d: dict) -> KeyTokenConfig:
    signals = {s: SignalConfig(**d[s]) for s in ("visual", "temporal", "entropy") if s in d}
    return KeyTokenConfig(**{**{k: v for k, v in d.items() if k not in signals}, **signals})


def test_every_overlay_builds_valid_configs(tmp_path) -> None:
    paths = pa.write(tmp_path, list(pa.FIGURES))
    assert len(paths) == sum(len(v) for v in pa.FIGURES.values()) == 27
    for p in paths:
        init = yaml.safe_load(p.read_text())["model"]["init_args"]
        kt = _key_tokens(init.get("key_tokens", {}))
        LossConfig(**init.get("loss", {}))
        from ktr.config import BaselineConfig, SamplingConfig

        get_algorithm(init.get("algorithm", "grpo"), BaselineConfig(), kt, SamplingConfig())
    cpu = yaml.safe_load((pa.write(tmp_path / "cpu", ["baselines"], cpu=True)[0]).read_text())
    assert "optim" not in cpu["model"]["init_args"]  # CPU runs keep the demo's learning rate


def test_an_overlay_parses_on_the_released_config(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["ktr"])
    path = pa.write(tmp_path, ["scores"])[1]  # kl
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(ROOT / "configs/qwen7b.yaml"), "--config", str(path), "--print_config"])
    assert e.value.code == 0
    cfg = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert cfg["key_tokens"]["visual"]["score"] == "kl" and cfg["key_tokens"]["visual"]["ratio"] == 0.2
    assert cfg["loss"]["beta"] == 0.04  # the released settings are kept under the overlay

"""The KeyTokenReport callback during `ktr fit`: pages for RL steps, the final-policy page, index, JSON, TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ktr.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_command_writes_a_report(tmp_path: Path, monkeypatch) -> None:
    # `ktr fit --config configs/demo.yaml --trainer.max_steps=4`: all four steps are warm-start (SFT) steps,
    # which have no key tokens; the callback's end-of-training page explains the last batch with the final policy.
    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(ROOT / "configs/demo.yaml"), "--trainer.max_steps=4",
          f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false"])
    pages = sorted(p.name for p in tmp_path.rglob("key_tokens/*.html"))
    assert pages == ["index.html", "step_0000004_final.html"]
    data = json.loads(next(tmp_path.rglob("key_tokens/step_0000004_final.json")).read_text())
    assert data["kind"] == "final" and data["signals"] == ["visual", "temporal", "entropy"]
    assert len(data["prompts"]) == 2 and all(len(p["completions"]) == 8 for p in data["prompts"])
    # `ktr explain` reads the run's real Lightning checkpoint (weights only)
    from PIL import Image

    from ktr.explain import main as explain

    Image.new("RGB", (56, 56), (30, 30, 200)).save(tmp_path / "blue.png")
    explain(["--config", str(ROOT / "configs/demo.yaml"), "--ckpt", str(next(tmp_path.rglob("checkpoints/last.ckpt"))),
             "--image", str(tmp_path / "blue.png"), "--question", "Which colour?", "--answer", "<answer>C</answer>",
             "--no-png", "--out", str(tmp_path / "explain")])
    comp = json.loads((tmp_path / "explain" / "report.json").read_text())["prompts"][0]["completions"][0]
    assert comp["text"] == "<answer>C</answer>" and comp["num_key"] >= 1


@pytest.mark.slow
def test_rl_steps_are_reported_with_index_and_tensorboard_text(tmp_path: Path, monkeypatch) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    every_step = tmp_path / "every_step.yaml"
    every_step.write_text("trainer:\n  callbacks:\n    - class_path: ktr.callbacks.KeyTokenReport\n"
                          "      init_args: {every_n_steps: 1, num_prompts: 1}\n")
    main(["fit", "--config", str(ROOT / "configs/demo.yaml"), "--config", str(every_step), "--trainer.max_steps=4",
          f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false",
          "--model.init_args.warm_start_steps=2", "--model.init_args.sampling.group_size=2",
          "--model.init_args.sampling.max_new_tokens=6", "--data.init_args.batch_size=2",
          "--trainer.val_check_interval=null", "--trainer.limit_val_batches=0"])
    out = next(tmp_path.rglob("key_tokens"))
    assert sorted(p.name for p in out.glob("*.html")) == ["index.html", "step_0000002.html", "step_0000003.html",
                                                          "step_0000004_final.html"]
    index = (out / "index.html").read_text()
    assert all(f'href="{n}"' in index for n in ("step_0000002.html", "step_0000003.html", "step_0000004_final.html"))
    step = json.loads((out / "step_0000002.json").read_text())
    assert step["kind"] == "train" and step["step"] == 2 and step["group_size"] == 2
    comps = step["prompts"][0]["completions"]
    assert len(comps) == 2 and all(c["advantage"] is not None and c["reward"] is not None for c in comps)
    assert all(set(c["thresholds"]) == {"visual", "temporal", "entropy"} for c in comps)
    events = next(tmp_path.rglob("events.out.tfevents*"))
    acc = EventAccumulator(str(events), size_guidance={"tensors": 0})
    acc.Reload()
    assert "key_tokens/report/text_summary" in acc.Tags()["tensors"]


def test_bad_settings_fail_naming_them() -> None:
    from ktr.callbacks import KeyTokenReport

    with pytest.raises(ValueError, match="every_n_steps"):
        KeyTokenReport(every_n_steps=0)
    with pytest.raises(ValueError, match="num_completions"):
        KeyTokenReport(num_completions=0)

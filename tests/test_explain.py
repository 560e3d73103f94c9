"""`ktr explain`: one video or image, generated or given answer, checkpoints as `ktr test` reads them, statistics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ktr.explain import load_explain_policy, main
from ktr.config import PolicyConfig
from ktr.model.policy import load_policy
from ktr.report.chromium import find_chromium

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs/demo.yaml")


@pytest.mark.slow
def test_explain_generates_an_answer_for_the_fixture_video(fixtures_dir, tmp_path, capsys) -> None:
    torch.set_num_threads(1)
    page = main(["--config", DEMO, "--video", str(fixtures_dir / "video1.mp4"), "--question", "What is shown?",
                 "--max-new-tokens", "8", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "report.json").read_text())
    comp = data["prompts"][0]["completions"][0]
    assert data["kind"] == "explain" and data["prompts"][0]["media"]["kind"] == "video"
    assert data["signals"] == ["visual", "temporal", "entropy"] and 1 <= comp["num_valid"] <= 8
    assert comp["num_key"] >= 1 and page.read_text().count('class="frames"') == 1
    out = capsys.readouterr().out
    if find_chromium() is None:
        assert "answer.png not written: Chromium is not installed" in out
    else:
        from PIL import Image

        assert Image.open(tmp_path / "answer.png").width <= 900 and "picture:" in out


@pytest.mark.slow
def test_explain_scores_a_given_answer_for_an_image(tmp_path) -> None:
    from PIL import Image

    torch.set_num_threads(1)
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "red.png")
    answer = "<think>The image is red.</think><answer>A</answer>"
    main(["--config", DEMO, "--image", str(tmp_path / "red.png"), "--question", "Which colour?",
          "--problem-type", "multiple choice", "--options", "A. red", "B. green", "--solution", "A",
          "--answer", answer, "--no-png", "--out", str(tmp_path / "out")])
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    comp = data["prompts"][0]["completions"][0]
    assert comp["text"] == answer and comp["rewards"] == {"accuracy": 1.0, "format": 1.0}
    assert comp["thresholds"]["temporal"] is None  # an image has no temporal pool
    assert all("temporal" not in t["signals"] for t in comp["tokens"])
    assert not (tmp_path / "out" / "answer.png").exists()


@pytest.fixture(scope="module")
def changed_policy():
    """The tiny policy with one weight changed (so loading the checkpoint is visible)."""
    torch.set_num_threads(1)
    cfg = PolicyConfig(attn_implementation="eager")
    policy = load_policy(cfg)
    with torch.no_grad():
        next(policy.model.parameters()).add_(0.5)
    return cfg, policy


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
def test_checkpoints_load_like_ktr_test(changed_policy, tmp_path) -> None:
    from ktr.model.saving import export_policy
    from ktr.config import LoraSettings
    from ktr.model.policy import apply_lora

    cfg, policy = changed_policy
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in policy.model.state_dict().items()}}, ckpt)
    assert _same_weights(load_explain_policy(cfg, str(ckpt)).model, policy.model)  # Lightning checkpoint
    export_policy(policy, tmp_path / "hf")
    assert _same_weights(load_explain_policy(cfg, str(tmp_path / "hf")).model, policy.model)  # HF directory
    lora = apply_lora(load_policy(cfg).model, LoraSettings(r=2, alpha=4, target_modules=["q_proj"]))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.fill_(0.01)
    lora.save_pretrained(tmp_path / "adapter")
    loaded = load_explain_policy(cfg, str(tmp_path / "adapter")).model  # LoRA adapter on the config's base
    assert _same_weights(loaded, lora)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_explain_policy(cfg, str(tmp_path / "nope.ckpt"))


def test_stats_over_a_folder_and_argument_errors(tmp_path, capsys) -> None:
    from tests.test_report import _report

    (tmp_path / "r.json").write_text(json.dumps(_report([["visual"], []], ["Red", " square"])))
    page = main(["--stats", str(tmp_path)])
    assert page == tmp_path / "stats.html" and page.is_file() and (tmp_path / "venn.png").is_file()
    with pytest.raises(SystemExit):
        main(["--question", "q", "--out", str(tmp_path)])
    assert "--video or --image" in capsys.readouterr().err


def test_explain_page_marks_above_the_noise_floor_and_says_what_it_explains(tmp_path, capsys) -> None:
    """(issue 29) The page names the checkpoint instead of `step None`, states the noise floor, warns that one
    short answer is too few tokens; the JSON keeps the training rule's key tokens beside explain's marks."""
    from PIL import Image

    torch.set_num_threads(1)
    Image.new("RGB", (64, 48), (30, 200, 30)).save(tmp_path / "green.png")
    main(["--config", DEMO, "--image", str(tmp_path / "green.png"), "--question", "Which colour?",
          "--answer", "<think>It is green.</think><answer>green</answer>", "--no-png", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "report.json").read_text())
    comp = data["prompts"][0]["completions"][0]
    assert data["step"] is None and data["checkpoint"] == "tiny"
    assert data["noise_floor"]["mads"] == 3.0 and data["noise_floor"]["min_score"] == 0.01
    assert comp["num_marked"] <= comp["num_key"] and set(comp["floors"]) == {"visual", "temporal", "entropy"}
    for t in comp["tokens"]:
        assert set(t["signals"]) <= set(t["rule_signals"])  # never more than the training rule selects
        for s in t["signals"]:
            assert t["scores"][s] > 0 and t["scores"][s] >= comp["floors"][s]
    page = (tmp_path / "report.html").read_text()
    assert "step None" not in page and "explain page · checkpoint: tiny" in page
    assert "noise floor" in page and "these statistics rest on too few tokens" in page
    assert "note: Few tokens" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--config", DEMO, "--image", str(tmp_path / "green.png"), "--question", "q", "--out", str(tmp_path),
              "--min-score", "-1"])

"""`video.rope_time`: `released` gives the 3D positions of transformers' `get_rope_index` without
`second_per_grid_ts` (its default 1.0), in every pass and in generate's inputs; `sampled` gives today's
`2 / sample_fps`. Evaluation pixel presets, and which configs use which reading."""

import sys
from pathlib import Path

import pytest
import torch
import yaml

from ktr.callbacks import EvalVideoSettings, SyntheticBenchmark
from ktr.cli import main
from ktr.data.video import VideoSettings
from ktr.model.families import core
from ktr.model.forward import rope_positions
from tests.helpers import synthetic_samples

ROOT = Path(__file__).resolve().parents[1]


def _positions(policy, batch):
    prompt_index = torch.arange(len(batch))
    return rope_positions(policy.model, batch.input_ids, batch.mm_token_type_ids, batch.attention_mask, batch,
                          prompt_index)


@torch.no_grad()
def test_released_equals_get_rope_index_without_second_per_grid_ts(tiny_policy) -> None:
    samples = synthetic_samples(tiny_policy.processor, 3, image_every=3)  # two videos and an image
    released = tiny_policy.processor.collate(samples, "released")
    sampled = tiny_policy.processor.collate(samples, "sampled")
    m = core(tiny_policy.model).model
    vid = released.is_video
    kw = dict(mm_token_type_ids=released.mm_token_type_ids, attention_mask=released.attention_mask,
              image_grid_thw=released.grid_thw[~vid], video_grid_thw=released.grid_thw[vid])
    absent, _ = m.get_rope_index(released.input_ids, **kw)  # no second_per_grid_ts at all
    assert torch.equal(_positions(tiny_policy, released), absent)
    fps = torch.tensor([s.media.sample_fps for s in samples if s.media.kind == "video"])
    assert (fps != 2.0).all()  # otherwise the two readings coincide and the test could not fail
    today, _ = m.get_rope_index(sampled.input_ids, second_per_grid_ts=2.0 / fps, **kw)
    assert torch.equal(_positions(tiny_policy, sampled), today)
    assert not torch.equal(today, absent)
    # generate reads the same tensor: 1.0 per video (= transformers' default) with `released`
    assert released.hf_vision_kwargs()["second_per_grid_ts"].tolist() == [1.0, 1.0]
    assert sampled.hf_vision_kwargs()["second_per_grid_ts"].tolist() == pytest.approx((2.0 / fps).tolist())


def test_rope_time_validated() -> None:
    with pytest.raises(ValueError, match="rope_time"):
        VideoSettings(rope_time="fps")  # type: ignore[arg-type]


def _printed(args, capsys) -> dict:
    with pytest.raises(SystemExit) as e:
        main([*args, "--print_config"])
    assert e.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("model", ["qwen7b.yaml", "qwen7b_qlora.yaml"])
def test_released_run_configs_use_released_rope_time(model, capsys, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["ktr"])
    cfg = _printed(["fit", "--config", str(ROOT / "configs" / model), "--config",
                    str(ROOT / "configs/data/video_r1_holmes_16k.yaml")], capsys)
    assert cfg["data"]["class_path"].endswith("Holmes16kDataModule")
    assert cfg["data"]["init_args"]["video"]["rope_time"] == "released"
    assert cfg["data"]["init_args"]["video"]["max_frames"] == 16  # the data config's settings are kept
    demo = _printed(["fit", "--config", str(ROOT / "configs/demo.yaml")], capsys)
    assert demo["data"]["init_args"]["video"]["rope_time"] == "sampled"


def test_eval_pixel_presets_and_record(tmp_path) -> None:
    bench = EvalVideoSettings(preset="released_eval_bench")
    assert (bench.min_pixels, bench.max_pixels) == (128 * 28 * 28, 128 * 28 * 28)
    assert bench.frame_max_pixels(16) == int(128 * 28 * 28 * 1.05)  # the 1.05 rule: 105,369
    readme = EvalVideoSettings(preset="video_r1_readme")
    assert readme.max_pixels == 256 * 28 * 28
    with pytest.raises(ValueError, match="preset"):
        EvalVideoSettings(preset="released_eval_bench", max_pixels=3136)
    ev = SyntheticBenchmark(num_questions=2, data_dir=str(tmp_path), video=bench)
    pixels = ev.settings(None, 1)["pixels"]
    assert pixels["preset"] == "released_eval_bench" and pixels["max_pixels"] == 100352
    assert pixels["rope_time"] == "sampled"

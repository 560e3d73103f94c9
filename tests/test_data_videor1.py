"""Video-R1 data modules: load-time schema errors, run-time skips, path resolution, SFT targets, configs.

The rows are real (``../shared/fixtures/video_r1_rows.json``, read in place); their media are small synthetic
files written here, plus deliberately broken ones.
"""

from __future__ import annotations

import copy
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ktr.data.base import PromptDataset, StepBatch
from ktr.data.processor import VisionLanguageProcessor
from ktr.data.skips import SkipCounter, SkipLimitExceeded, Skipped
from ktr.data.video import ImageSettings, VideoSettings
from ktr.data.videor1 import (DataFileError, Holmes16kDataModule, VideoR1COTDataModule, VideoR1DataModule, load_rows,
                              resolve_media_path)
from tests import FIXTURES

av = pytest.importorskip("av")
PIL = pytest.importorskip("PIL.Image")

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(video=VideoSettings(min_pixels=56 * 56, max_pixels=56 * 56),
             image=ImageSettings(min_pixels=56 * 56, max_pixels=56 * 84))


@pytest.fixture(scope="module")
def real_rows() -> list[dict]:
    f = FIXTURES / "video_r1_rows.json"
    if not f.is_file():
        pytest.skip(f"fixture {f} absent (needs the shared fixtures next to the repo)")
    return json.loads(f.read_text())


@pytest.fixture(scope="module")
def processor() -> VisionLanguageProcessor:
    from ktr.model.tokenizer import build_qwen2_tokenizer

    return VisionLanguageProcessor(build_qwen2_tokenizer(), 151655, 151656)


def write_video(path: Path, frames: int = 8, size: int = 56, fps: int = 4) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.height, stream.width, stream.pix_fmt = size, size, "yuv420p"
        for i in range(frames):
            array = np.full((size, size, 3), 30 * i, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_image(path: Path, size: tuple[int, int] = (84, 56)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.fromarray(np.full((size[1], size[0], 3), 120, dtype=np.uint8)).save(path)


def _pick(rows: list[dict], data_type: str, problem_type: str, skip: int = 0) -> dict:
    found = [r for r in rows if r["data_type"] == data_type and r["problem_type"] == problem_type]
    return copy.deepcopy(found[skip])


@pytest.fixture(scope="module")
def dataset(real_rows, tmp_path_factory) -> dict:
    """A media root and a data file: 6 decodable rows, 4 with broken media, 3 with schema errors.

    Each row's ``problem_id`` says what it is; the good rows keep their real relative paths.
    """
    root = tmp_path_factory.mktemp("videor1") / "Video-R1-data"
    good = [_pick(real_rows, "video", "multiple choice"), _pick(real_rows, "video", "multiple choice", 1),
            _pick(real_rows, "image", "multiple choice"), _pick(real_rows, "image", "OCR"),
            _pick(real_rows, "image", "numerical"), _pick(real_rows, "video", "numerical")]
    for i, row in enumerate(good):
        row["problem_id"] = f"good-{i}"
        target = root / row["path"]
        write_video(target) if row["data_type"] == "video" else write_image(target)
    broken = {"corrupt": _pick(real_rows, "video", "multiple choice", 2),
              "empty": _pick(real_rows, "video", "multiple choice", 3),
              "missing": _pick(real_rows, "video", "multiple choice", 4),
              "badimage": _pick(real_rows, "image", "free-form")}
    for name, row in broken.items():
        row["problem_id"], row["path"] = name, f"./broken/{name}.{'png' if name == 'badimage' else 'mp4'}"
    (root / "broken").mkdir()
    (root / "broken" / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    (root / "broken" / "empty.mp4").write_bytes(b"")
    (root / "broken" / "badimage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    unknown = _pick(real_rows, "image", "free-form", 1)
    unknown["problem_type"] = "essay"
    no_solution = _pick(real_rows, "image", "OCR", 1)
    del no_solution["solution"]
    options_numerical = _pick(real_rows, "image", "numerical", 1)
    options_numerical["options"] = ["A. 1", "B. 2"]
    rows = good[:3] + [broken["corrupt"], unknown] + good[3:] + [broken["empty"], no_solution, broken["missing"],
                                                                 options_numerical, broken["badimage"]]
    data = root / "train.json"
    data.write_text(json.dumps(rows))
    return {"root": root, "file": data, "rows": rows, "good": {r["problem_id"] for r in good},
            "broken": set(broken), "invalid_rows": {4, 9, 11}}


def make_dm(dataset, processor, cls=VideoR1DataModule, **kwargs) -> VideoR1DataModule:
    args = dict(train_file=str(dataset["file"]), media_root=str(dataset["root"]), batch_size=4, shuffle=False,
                max_skip_fraction=0.5, **SMALL)
    args.update(kwargs)
    dm = cls(**args)
    dm.processor = processor
    return dm


def drain(loader) -> tuple[list[dict], list[Skipped], list[StepBatch]]:
    rows, skipped, batches = [], [], []
    for batch in loader:
        assert isinstance(batch, StepBatch)
        batches.append(batch)
        skipped += batch.skipped
        if batch.prompts is not None:
            rows += batch.prompts.rows
    return rows, skipped, batches


# ------------------------------------------------------------------------------------------------ load time


def test_invalid_rows_are_skipped_counted_and_reported_once(dataset, processor, caplog) -> None:
    dm = make_dm(dataset, processor)
    with caplog.at_level(logging.WARNING, logger="ktr.data.videor1"):
        rows = dm.train_rows()
    assert len(rows) == 10  # 13 rows - 3 invalid; the 4 with broken media are only found at run time
    report = dm.reports[0]
    assert (report.total, report.invalid_rows, report.kept) == (13, 3, 10)
    assert dict(report.invalid) == {"field 'problem_type'": 1, "missing field 'solution'": 1, "field 'options'": 1}
    assert [p.row for p in report.examples] == sorted(dataset["invalid_rows"])
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    msg = warnings[0]
    assert str(dataset["file"]) in msg and "3 of 13 rows" in msg
    assert "row 4: field 'problem_type': unknown value 'essay'" in msg
    assert "row 9: missing field 'solution'" in msg
    assert "row 11: field 'options': 2 options given for problem_type 'numerical'" in msg


def test_strict_raises_on_first_invalid_row_naming_file_row_field(dataset, processor) -> None:
    dm = make_dm(dataset, processor, strict=True)
    with pytest.raises(DataFileError, match=r"train\.json, row 4: field 'problem_type': unknown value 'essay'"):
        dm.train_rows()


def test_too_many_invalid_rows_fail_loading(dataset, processor) -> None:
    dm = make_dm(dataset, processor, max_skip_fraction=0.2)  # 3/13 = 23% > 20%
    with pytest.raises(DataFileError, match="3 of 13 rows are invalid.*max_skip_fraction=0.2"):
        dm.train_rows()


def test_jsonl_gives_the_same_rows_and_names_lines(dataset, processor, tmp_path) -> None:
    lines = [json.dumps(r) for r in dataset["rows"]]
    lines.insert(2, "")  # blank lines are ignored
    lines.insert(5, '{"problem": "truncated')
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    dm = make_dm(dataset, processor, train_file=str(jsonl))
    assert dm.train_rows() == make_dm(dataset, processor).train_rows()
    report = dm.reports[0]
    assert (report.total, report.invalid_rows) == (14, 4)
    assert str(report.examples[0]).endswith(
        "row 4 (line 6): line is not valid JSON: Unterminated string starting at (column 13)")
    with pytest.raises(DataFileError, match=r"train\.jsonl, row 4 \(line 6\): line is not valid JSON"):
        load_rows(jsonl, strict=True)


def test_malformed_json_list_names_the_file(tmp_path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('[{"problem": 1}, ')
    with pytest.raises(DataFileError, match=r"bad\.json: not valid JSON"):
        load_rows(bad)


def test_data_types_filter_max_samples_and_split(dataset, processor, tmp_path) -> None:
    videos = make_dm(dataset, processor, data_types=["video"]).train_rows()
    assert {r["data_type"] for r in videos} == {"video"} and len(videos) == 6  # 3 good + 3 broken videos
    assert [r["problem_id"] for r in make_dm(dataset, processor, max_samples=2).train_rows()] == ["good-0", "good-1"]
    dm = make_dm(dataset, processor, val_fraction=0.3)
    train, val = dm.train_rows(), dm.val_rows()
    assert (len(train), len(val)) == (7, 3)  # round(0.3 * 10) held out
    assert {r["problem_id"] for r in train}.isdisjoint(r["problem_id"] for r in val)
    again = make_dm(dataset, processor, val_fraction=0.3)
    assert again.val_rows() == val  # the split depends only on the seed
    val_file = tmp_path / "val.json"
    val_file.write_text(json.dumps(dataset["rows"][:2]))
    assert [r["problem_id"] for r in make_dm(dataset, processor, val_file=str(val_file)).val_rows()] == [
        "good-0", "good-1"]
    with pytest.raises(ValueError, match="either val_file or val_fraction"):
        make_dm(dataset, processor, val_file=str(val_file), val_fraction=0.1)
    with pytest.raises(FileNotFoundError, match="train_file: data file '/nonexistent.json' not found"):
        make_dm(dataset, processor, train_file="/nonexistent.json")


def test_holmes_warns_about_an_unexpected_row_count(dataset, processor, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="ktr.data.videor1"):
        make_dm(dataset, processor, cls=Holmes16kDataModule).train_rows()
    assert any("has 13 rows; the released Holmes16kDataModule file has 16916" in r.getMessage()
               for r in caplog.records)


# ------------------------------------------------------------------------------------------------ paths


def test_resolve_media_path(tmp_path) -> None:
    root = tmp_path / "LLaVA-Video-178K"
    assert resolve_media_path("./LLaVA-Video-178K/a/b.mp4", tmp_path) == tmp_path / "LLaVA-Video-178K/a/b.mp4"
    assert resolve_media_path("a/b.png", tmp_path) == tmp_path / "a/b.png"
    assert resolve_media_path(str(tmp_path / "x.mp4"), "/elsewhere") == tmp_path / "x.mp4"
    # root already ends with the first component: the doubled join does not exist, the stripped one does
    (root / "a").mkdir(parents=True)
    (root / "a" / "b.mp4").write_bytes(b"x")
    assert resolve_media_path("./LLaVA-Video-178K/a/b.mp4", root) == root / "a/b.mp4"
    # ... but a real nested directory of the same name wins, and neither existing keeps the plain join
    (root / "LLaVA-Video-178K" / "a").mkdir(parents=True)
    (root / "LLaVA-Video-178K" / "a" / "b.mp4").write_bytes(b"x")
    assert resolve_media_path("./LLaVA-Video-178K/a/b.mp4", root) == root / "LLaVA-Video-178K/a/b.mp4"
    assert resolve_media_path("./LLaVA-Video-178K/zz.mp4", root) == root / "LLaVA-Video-178K/zz.mp4"


def test_media_root_defaults_to_the_data_file_directory(dataset, processor) -> None:
    dm = make_dm(dataset, processor, media_root=None)
    assert dm.media_root == dataset["root"]
    media = dm.load_media(dm.train_rows()[0])
    assert media.kind == "video" and media.path == str(dataset["root"] / dataset["rows"][0]["path"])


# ------------------------------------------------------------------------------------------------ run time


def test_loader_keeps_decodable_rows_and_skips_broken_ones(dataset, processor) -> None:
    dm = make_dm(dataset, processor)
    rows, skipped, batches = drain(dm.train_dataloader())
    assert [len(b.skipped) + (len(b.prompts) if b.prompts else 0) for b in batches] == [4, 4, 2]
    assert sorted(r["problem_id"] for r in rows) == sorted(dataset["good"])  # each once: nothing substituted
    reasons = {s.path.split("/")[-1]: s.reason for s in skipped}
    assert set(reasons) == {"corrupt.mp4", "empty.mp4", "missing.mp4", "badimage.png"}
    assert reasons["missing.mp4"].startswith("FileNotFoundError:") and "broken/missing.mp4" in reasons["missing.mp4"]
    assert reasons["empty.mp4"].startswith("MediaDecodeError:") and "0 bytes" in reasons["empty.mp4"]
    assert reasons["corrupt.mp4"].startswith("MediaDecodeError:")
    assert reasons["badimage.png"].startswith("MediaDecodeError:") and "PIL cannot read it" in reasons["badimage.png"]
    # Skipped.index points back at the row that failed
    train = dm.train_rows()
    assert {train[s.index]["problem_id"] for s in skipped} == dataset["broken"]


def test_mixed_image_and_video_batch_collates(dataset, processor) -> None:
    dm = make_dm(dataset, processor)
    first = next(iter(dm.train_dataloader()))  # rows 0-3: video, video, image, corrupt video
    prompts = first.prompts
    assert [m.kind for m in prompts.media] == ["video", "video", "image"]
    assert prompts.is_video.tolist() == [True, True, False]
    # 8 frames at 4 fps -> 4 frames of 56x56 -> grid (2, 4, 4); the 84x56 image -> 1 frame of 84x56 -> (1, 4, 6)
    assert prompts.grid_thw.tolist() == [[2, 4, 4], [2, 4, 4], [1, 4, 6]]
    assert prompts.pixel_values.shape == (32 + 32 + 24, 3 * 2 * 14 * 14)
    assert prompts.second_per_grid_ts.tolist() == [1.0, 1.0, 0.0]  # 2 / sample_fps (4 / 8 * 4 = 2 fps)
    n_tokens = (prompts.mm_token_type_ids == 2).sum(-1).tolist(), (prompts.mm_token_type_ids == 1).sum(-1).tolist()
    assert n_tokens == ([8, 8, 0], [0, 0, 6])  # t*h*w / merge**2 placeholders per prompt
    kwargs = prompts.hf_vision_kwargs()
    assert kwargs["video_grid_thw"].tolist() == [[2, 4, 4], [2, 4, 4]] and kwargs["image_grid_thw"].tolist() == [
        [1, 4, 6]]
    assert [s.path for s in first.skipped] == ["./broken/corrupt.mp4"]


def test_workers_decode_and_report_skips(dataset, processor) -> None:
    dm = make_dm(dataset, processor, num_workers=1)
    rows, skipped, _ = drain(dm.train_dataloader())
    assert sorted(r["problem_id"] for r in rows) == sorted(dataset["good"])
    assert sorted(s.path for s in skipped) == sorted(f"./broken/{n}" for n in (
        "badimage.png", "corrupt.mp4", "empty.mp4", "missing.mp4"))


def test_skip_counter_over_a_real_epoch(dataset, processor, caplog) -> None:
    dm = make_dm(dataset, processor)
    counter = SkipCounter(max_fraction=0.5, min_seen=4)
    with caplog.at_level(logging.WARNING, logger="ktr.data.skips"):
        for _ in range(2):  # two epochs: each broken path is counted twice but warned about once
            for batch in dm.train_dataloader():
                counter.update_batch(batch)
    assert (counter.seen, counter.skipped) == (20, 8)
    assert dict(counter.by_reason) == {"MediaDecodeError": 6, "FileNotFoundError": 2}
    assert len([r for r in caplog.records if r.name == "ktr.data.skips"]) == 4
    assert counter.metrics()["data/skipped_fraction"] == pytest.approx(0.4)
    tight = make_dm(dataset, processor, max_skip_fraction=0.3, skip_min_seen=8)
    strict, batches = tight.make_skip_counter(), 0
    with pytest.raises(SkipLimitExceeded, match=r"4 of 10 samples \(40\.0%\).*max_skip_fraction=0\.3"):
        for batch in tight.train_dataloader():  # 1/4, then 2/8 = 25%, then 4/10
            batches += 1
            strict.update_batch(batch)
    assert batches == 3


# ------------------------------------------------------------------------------------------------ SFT


def test_cot_rows_need_process_and_give_the_sft_target(dataset, processor, tmp_path) -> None:
    rows = copy.deepcopy(dataset["rows"][:3])
    rows[0]["process"] = "<think>Let me think. The ball moves left.</think>"
    rows[1]["process"] = "<think>Hmm.</think>"
    rows[2]["process"] = "no tags here"
    f = tmp_path / "cot.json"
    f.write_text(json.dumps(rows))
    dm = make_dm(dataset, processor, cls=VideoR1COTDataModule, train_file=str(f), max_skip_fraction=0.5)
    kept = dm.train_rows()
    assert [r["problem_id"] for r in kept] == ["good-0", "good-1"]
    assert "row 2: field 'process': expected a string holding <think>...</think>" in str(dm.reports[0].examples[0])
    target = dm.sft_target(kept[0], 0)
    assert target == "<think>Let me think. The ball moves left.</think>\n" + rows[0]["solution"]
    ds = PromptDataset(kept, dm.load_media, processor, target=dm.sft_target)
    batch = dm.collate([ds[0], ds[1]])
    tok = processor.tokenizer
    first = batch.prompts.target_ids[0][batch.prompts.target_mask[0]]
    assert tok.decode(first) == target + "<|im_end|>"
    with pytest.raises(ValueError, match="has no 'process' field"):
        make_dm(dataset, processor).sft_target(dataset["rows"][0], 0)


# ------------------------------------------------------------------------------------------------ skip counter


def test_skip_counter_threshold_and_messages(caplog) -> None:
    bad = [Skipped(i, f"./v{i}.mp4", "MediaDecodeError: cannot decode") for i in range(3)]
    missing = [Skipped(9, "./missing.mp4", "FileNotFoundError: [Errno 2] video file not found")]
    c = SkipCounter(max_fraction=0.2, min_seen=20)
    with caplog.at_level(logging.WARNING, logger="ktr.data.skips"):
        c.update(10, bad)  # 3/10 = 30% but fewer than 20 seen: no check yet
        c.update(10, bad[:1])  # 4/20 = 20%: equal to the limit is allowed; same path again: not warned again
    assert (c.seen, c.skipped, len(caplog.records)) == (20, 4, 3)
    c.update(5, missing)  # 5/25 = 20%
    with pytest.raises(SkipLimitExceeded) as err:
        c.update(1, missing)  # 6/26 = 23.1%
    msg = str(err.value)
    assert "6 of 26 samples (23.1%)" in msg and "max_skip_fraction=0.2" in msg
    assert "MediaDecodeError: 4, FileNotFoundError: 2" in msg and "'./v0.mp4'" in msg and "'./missing.mp4'" in msg
    short = SkipCounter(max_fraction=0.5, min_seen=20)
    short.update(3, bad[:2])
    short.check()  # too few seen
    with pytest.raises(SkipLimitExceeded, match="2 of 3"):
        short.check(final=True)
    with pytest.raises(ValueError, match="cannot be smaller"):
        short.update(1, bad)
    with pytest.raises(ValueError, match="max_fraction"):
        SkipCounter(max_fraction=1.5)
    restored = SkipCounter()
    restored.load_state_dict(c.state_dict())
    assert (restored.seen, restored.skipped, dict(restored.by_reason)) == (26, 6, dict(c.by_reason))


# ------------------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("name", ["video_r1_holmes_16k", "video_r1_260k", "video_r1_cot_165k"])
@pytest.mark.slow
def test_data_configs_parse_and_instantiate(name, dataset, tmp_path) -> None:
    from jsonargparse import ArgumentParser

    from ktr.data.base import BaseDataModule

    parser = ArgumentParser()
    parser.add_argument("--config", action="config")
    parser.add_subclass_arguments(BaseDataModule, "data")
    cfg = parser.parse_args(["--config", str(REPO / "configs" / "data" / f"{name}.yaml")])
    assert cfg.data.init_args.train_file.startswith("/path/to/")
    assert cfg.data.init_args.video.max_frames == 16 and cfg.data.init_args.image.max_pixels == 256 * 28 * 28
    rows = copy.deepcopy(dataset["rows"][:2])
    for r in rows:
        r["process"] = "<think>x</think>"
    data = tmp_path / "d.json"
    data.write_text(json.dumps(rows))
    cfg.data.init_args.train_file, cfg.data.init_args.media_root = str(data), str(dataset["root"])
    dm = parser.instantiate_classes(cfg).data
    assert isinstance(dm, VideoR1DataModule) and dm.video.min_pixels == 128 * 28 * 28
    assert len(dm.train_rows()) == 2


# ------------------------------------------------------------------------------------------------ training run


@pytest.fixture(scope="module")
def run_data(real_rows, tmp_path_factory) -> Path:
    """6 rows: a video, a corrupt video, a missing video, an image, a bad row (unknown type), an image."""
    root = tmp_path_factory.mktemp("run")
    good = [_pick(real_rows, "video", "multiple choice"), _pick(real_rows, "image", "multiple choice"),
            _pick(real_rows, "image", "numerical")]
    for row in good:
        (write_video if row["data_type"] == "video" else write_image)(root / row["path"])
    corrupt, missing = _pick(real_rows, "video", "multiple choice", 2), _pick(real_rows, "video", "multiple choice", 3)
    corrupt["path"], missing["path"] = "./broken/corrupt.mp4", "./broken/missing.mp4"
    (root / "broken").mkdir()
    (root / "broken" / "corrupt.mp4").write_bytes(np.random.default_rng(1).bytes(2048))
    bad = _pick(real_rows, "image", "free-form")
    bad["problem_type"] = "essay"
    data = root / "train.json"
    data.write_text(json.dumps([good[0], corrupt, missing, good[1], bad, good[2]]))
    return data


def _fit_args(data: Path, save_dir: Path, *extra: str) -> list[str]:
    return ["fit", "--seed_everything", "0", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
            "--trainer.max_epochs", "1", "--trainer.log_every_n_steps", "1", "--trainer.enable_checkpointing", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.num_sanity_val_steps", "0", "--trainer.logger.init_args.save_dir", str(save_dir),
            "--model", "ktr.module.KTRModule", "--model.sampling.group_size", "2",
            "--model.sampling.max_new_tokens", "8", "--model.loss.beta", "0.0",
            "--data", "ktr.data.videor1.VideoR1DataModule", "--data.train_file", str(data), "--data.batch_size", "2",
            "--data.shuffle", "false", "--data.video", '{"min_pixels": 3136, "max_pixels": 3136}',
            "--data.image", '{"min_pixels": 3136, "max_pixels": 4704}', *extra]


@pytest.mark.slow
def test_training_run_over_bad_data_completes_and_logs_skips(run_data, tmp_path, caplog, monkeypatch) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ktr.cli import main

    torch.set_num_threads(1)
    monkeypatch.setattr(sys, "argv", ["ktr"])  # LightningCLI warns when pytest's own arguments are present
    with caplog.at_level(logging.WARNING, logger="ktr.data"):
        cli = main(_fit_args(run_data, tmp_path, "--data.max_skip_fraction", "0.5"))
    # batches [video, corrupt], [missing, image], [image]: 3 optimizer steps on the 3 good rows
    assert cli.trainer.global_step == 3
    assert any("1 of 6 rows are invalid" in r.getMessage() and "row 4: field 'problem_type'" in r.getMessage()
               for r in caplog.records)
    events = sorted(tmp_path.rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file written"
    acc = EventAccumulator(str(events[-1]))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("data/skipped")] == [(0, 1.0), (1, 1.0), (2, 0.0)]


@pytest.mark.slow
def test_training_run_stops_when_too_many_samples_fail(run_data, tmp_path, monkeypatch) -> None:
    from ktr.cli import main

    torch.set_num_threads(1)
    monkeypatch.setattr(sys, "argv", ["ktr"])  # LightningCLI warns when pytest's own arguments are present
    try:
        main(_fit_args(run_data, tmp_path, "--data.max_skip_fraction", "0.3", "--data.skip_min_seen", "4"))
    except SkipLimitExceeded as err:  # after 2 batches: 2 of 4 samples (50%) failed
        assert "2 of 4 samples (50.0%)" in str(err) and "max_skip_fraction=0.3" in str(err)
        return
    raise AssertionError("the run finished although 40% of its samples could not be decoded")


def test_skip_accounting_imports_neither_torch_nor_lightning() -> None:
    import subprocess

    code = "import sys, ktr.data.skips; assert not {'torch', 'lightning'} & set(sys.modules), sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)

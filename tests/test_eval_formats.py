"""Every benchmark format parses the real fixture rows; breakdown keys are complete; paths resolve."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from ktr.eval import BENCHMARKS, SchemaError, get_benchmark, resolve_video_path
from ktr.eval.benchmarks.tempcompass import TempCompassBenchmark
from ktr.eval.benchmarks.videommmu import VideoMMMUBenchmark
from tests import FIXTURES as FIXTURES_ROOT

FIXTURES = FIXTURES_ROOT / "benchmarks"


@pytest.fixture(scope="module")
def fx() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"benchmark fixtures not found at {FIXTURES}")
    return FIXTURES


# (benchmark, fixture file, format, number of items)
CASES = [
    ("videomme", "videomme_sample.json", "video_r1", 24),
    ("videomme", "videomme_sample.json", "official", 24),  # the Video-R1 file keeps the flat official fields
    ("tempcompass", "tempcompass_sample.json", "official", 120),  # 156 questions - 36 captioning
    ("videommmu", "videommmu_sample.json", "video_r1", 25),
    ("mmvu", "mmvu_sample.json", "official", 20),
    ("mmvu", "mmvu_videor1_format_sample.json", "video_r1", 20),
    ("videoholmes", "videoholmes_sample.json", "official", 16),
    ("videoholmes", "videoholmes_videor1_format_sample.json", "video_r1", 12),
]


def _load(fx: Path, name: str, file: str, fmt: str, root: str = "/data/Evaluation"):
    bench = get_benchmark(name)(fx / file, root, fmt)
    return bench, bench.load()


@pytest.mark.parametrize(("name", "file", "fmt", "n"), CASES)
def test_every_format_parses_with_complete_fields_and_keys(fx, name, file, fmt, n):
    bench, items = _load(fx, name, file, fmt)
    assert len(items) == n
    assert len({it.qid for it in items}) == n
    for it in items:
        assert os.path.isabs(it.video_path) and it.video_path.endswith(".mp4")
        assert it.prompt_text and it.answer and it.problem_type
        keys = bench.breakdown_keys(it)
        assert set(keys) == set(bench.breakdown_fields)
        assert all(isinstance(v, str) and v and v != "unknown" for v in keys.values()), keys
    assert bench.prompt_variant and bench.extraction_rule
    assert bench.settings()["extraction_rule"] == bench.extraction_rule


def test_registry_names_and_errors():
    assert sorted(BENCHMARKS) == ["mmvu", "tempcompass", "videoholmes", "videomme", "videommmu"]
    with pytest.raises(ValueError, match="expected one of.*videomme"):
        get_benchmark("video-mme")
    with pytest.raises(ValueError, match="unknown format 'offical'"):
        get_benchmark("mmvu")("x.json", "/v", "offical")


def test_videomme_both_formats_agree(fx):
    _, r1 = _load(fx, "videomme", "videomme_sample.json", "video_r1")
    _, off = _load(fx, "videomme", "videomme_sample.json", "official")
    assert Counter(it.meta["duration"] for it in r1) == {"short": 8, "medium": 8, "long": 8}
    assert [it.answer for it in r1] == [it.answer for it in off]  # <answer>C</answer> vs "answer": "C"
    assert off[0].qid == "001-1" and r1[0].qid == "1"
    assert off[0].video_path == "/data/Evaluation/fFjv93ACGo8.mp4"
    assert r1[0].video_path == "/data/Evaluation/VideoMME/fFjv93ACGo8.mp4"  # not .../Evaluation/Evaluation/...
    assert off[0].prompt_text.endswith("D. The three kinds are of the same number.\nThe best answer is:")
    assert off[0].prompt_text.startswith("Select the best answer to the following multiple-choice question")
    assert r1[0].prompt_text.startswith(
        "When demonstrating the Germany modern Christmas tree is initially decorated with apples, candles and "
        "berries, which kind of the decoration has the largest number?Options:\nA. Apples.\n")
    assert "between the <think> and </think> tags" in r1[0].prompt_text


def test_videomme_official_per_video_layout(fx, tmp_path):
    rows = json.loads((fx / "videomme_sample.json").read_text())
    videos: dict[str, dict] = {}
    for r in rows:  # regroup the flat rows as the official repository's per-video JSON
        video_fields = ("video_id", "duration", "domain", "sub_category", "url")
        v = videos.setdefault(r["video_id"], {k: r[k] for k in video_fields})
        question_fields = ("question_id", "task_type", "question", "options", "answer")
        v.setdefault("questions", []).append({k: r[k] for k in question_fields})
    nested = tmp_path / "videomme_official.json"
    nested.write_text(json.dumps(list(videos.values())))
    _, flat_items = _load(fx, "videomme", "videomme_sample.json", "official")
    nested_items = get_benchmark("videomme")(nested, "/data/Evaluation", "official").load()
    assert [(i.qid, i.video_path, i.prompt_text, i.meta) for i in nested_items] == [
        (i.qid, i.video_path, i.prompt_text, i.meta) for i in flat_items]  # videoID read from the url


def test_videommmu_tracks_from_problem_id(fx):
    _, items = _load(fx, "videommmu", "videommmu_sample.json", "video_r1")
    tracks = {int(it.qid): it.meta["track"] for it in items}
    assert {q for q, t in tracks.items() if t == "Adaptation"} == {1, 2, 3, 4, 5, 6, 14, 18, 19}
    assert {q for q, t in tracks.items() if t == "Comprehension"} == set(range(301, 309))
    assert {q for q, t in tracks.items() if t == "Perception"} == set(range(601, 609))
    assert Counter(it.problem_type for it in items) == {"multiple choice": 22, "numerical": 3}
    numeric = next(it for it in items if it.qid == "14")
    assert numeric.answer == "12.97" and "Please provide the numerical value" in numeric.prompt_text


def test_videommmu_bad_problem_id_names_row_and_field(fx, tmp_path):
    rows = json.loads((fx / "videommmu_sample.json").read_text())
    rows[2]["problem_id"] = 901
    bad = tmp_path / "mmmu.json"
    bad.write_text(json.dumps(rows))
    with pytest.raises(SchemaError, match=r"mmmu\.json: row 2: field 'problem_id': 901 is outside 1\.\.900"):
        VideoMMMUBenchmark(bad, "/v").load()


def test_videommmu_official_rows(fx, tmp_path):
    rows = json.loads((fx / "videommmu_sample.json").read_text())
    official = [{"id": Path(r["path"]).stem, "question": r["problem"], "question_type": "multiple-choice",
                 "options": [o[3:] for o in r["options"]], "answer": r["solution"][8]} for r in rows[:3]]
    path = tmp_path / "perception.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in official))
    items = VideoMMMUBenchmark(path, "/v", "official", track="Perception").load()
    assert [i.qid for i in items] == [
        "Perception/dev_Biology_3", "Perception/dev_Geography_5", "Perception/test_Geography_8"]
    assert items[0].options[:2] == ["A. aldose", "B. ketose"]
    assert items[0].prompt_text.endswith("J. sucrose\nPlease directly output the option letter/data as the answer.")
    assert items[0].video_path == "/v/dev_Biology_3.mp4"
    with pytest.raises(SchemaError, match="field 'track'"):
        VideoMMMUBenchmark(path, "/v", "official").load()


def test_mmvu_disciplines_and_formats(fx):
    bench, off = _load(fx, "mmvu", "mmvu_sample.json", "official")
    assert bench.excluded == {"open-ended": 0}
    assert len({i.meta["subject"] for i in off}) == 20
    by_subject = {i.meta["subject"]: i.meta["discipline"] for i in off}
    assert by_subject["Materials Science"] == "Science" and by_subject["Electrical Engineering"] == "Engineering"
    assert by_subject["Preventive Medicine"] == "Healthcare" and by_subject["Law"] == "Humanities and Social Science"
    assert off[0].video_path == "/data/Evaluation/videos/Chemistry/0.mp4"
    assert off[0].options[0] == "A: 10.0" and "\nA: 10.0\nB: 5.0\n" in off[0].prompt_text
    assert off[0].prompt_text.startswith("\nQuestion: Assume that 2.24 liters")
    _, r1 = _load(fx, "mmvu", "mmvu_videor1_format_sample.json", "video_r1")
    assert r1[0].meta == {"subject": "Chemistry", "discipline": "Science"}
    assert r1[2].meta == {"subject": "Materials Science", "discipline": "Science"}  # from .../Materials_Science/0.mp4
    assert (r1[0].answer, off[0].answer) == ("A", "A")  # validation_1 is the first multiple-choice question


def test_mmvu_open_ended_rows_are_excluded_and_unknown_subject_named(fx, tmp_path):
    rows = json.loads((fx / "mmvu_sample.json").read_text())
    rows[0]["question_type"] = "open-ended"
    rows[5]["metadata"]["subject"] = "Alchemy"
    path = tmp_path / "validation.json"
    path.write_text(json.dumps(rows))
    expected = r"validation\.json: row 5\.metadata: field 'subject': unknown MMVU subject 'Alchemy'"
    with pytest.raises(SchemaError, match=expected):
        get_benchmark("mmvu")(path, "/v", "official").load()
    rows[5]["metadata"]["subject"] = "Biology"
    path.write_text(json.dumps(rows))
    bench = get_benchmark("mmvu")(path, "/v", "official")
    assert len(bench.load()) == 19 and bench.excluded == {"open-ended": 1}


def test_videoholmes_official_and_video_r1(fx):
    _, off = _load(fx, "videoholmes", "videoholmes_sample.json", "official")
    types = Counter(i.meta["question_type"] for i in off)
    assert types == {"SR": 2, "IMC": 2, "TCI": 2, "TA": 2, "MHR": 2, "PAR": 4, "CTI": 2}
    assert off[0].qid == "RSmjqss0XKQ/1" and off[8].qid == "dGS48Kcax5k/1"
    assert off[0].video_path == "/data/Evaluation/RSmjqss0XKQ.mp4"
    assert "The question is: What is the relationship between the woman in blue and the man in green?. The options " \
           "are: A: Cleaners, B: Colleagues from the same department, C: Siblings," in off[0].prompt_text
    assert off[0].prompt_text.endswith("F: Office coworkers. Your answer:")
    _, r1 = _load(fx, "videoholmes", "videoholmes_videor1_format_sample.json", "video_r1", root="/holmes/videos")
    assert len({i.meta["question_type"] for i in r1}) == 6
    assert r1[0].video_path == "/holmes/videos/fH6bbNJJfqk.mp4"  # /nas-ssd2/... rebased by file name
    assert r1[0].answer == "F"


def test_tempcompass_official_combined_file(fx):
    bench, items = _load(fx, "tempcompass", "tempcompass_sample.json", "official", root="/tc/videos")
    assert bench.excluded == {"captioning (LLM judge only)": 36}
    assert Counter(i.meta["task_type"] for i in items) == {"multi-choice": 32, "yes_no": 61, "caption_matching": 27}
    assert {i.meta["dimension"] for i in items} == {"action", "speed", "direction", "order", "attribute_change"}
    first = items[0]
    assert (first.qid, first.answer) == ("multi-choice/1034419625/action/0", "A")
    assert first.video_path == "/tc/videos/1034419625.mp4"
    assert first.prompt_text.endswith("C. passing a basketball\nPlease directly give the best option:")
    yes_no = next(i for i in items if i.meta["task_type"] == "yes_no")
    assert yes_no.prompt_text == "Is the man dunking?\nPlease answer yes or no:" and yes_no.answer == "yes"
    fine = {(i.meta["video_id"], i.meta["dimension"]): i.meta["fine_type"] for i in items}
    assert fine[("1077507593", "action")] == "coarse-grained action"
    assert fine[("1077507593", "order")] == "order"
    assert fine[("1059718130", "attribute_change")] == "color & light change"


def test_tempcompass_official_repository_layout(fx, tmp_path):
    data = json.loads((fx / "tempcompass_sample.json").read_text())
    (tmp_path / "questions").mkdir()
    for task in ("multi-choice", "yes_no", "caption_matching", "captioning"):
        (tmp_path / "questions" / f"{task}.json").write_text(json.dumps(data[task]))
    (tmp_path / "meta_info.json").write_text(json.dumps(data["meta_info"]))
    _, combined = _load(fx, "tempcompass", "tempcompass_sample.json", "official")
    from_dir = TempCompassBenchmark(tmp_path, "/data/Evaluation", "official").load()
    assert [(i.qid, i.prompt_text, i.meta) for i in from_dir] == [(i.qid, i.prompt_text, i.meta) for i in combined]
    one = TempCompassBenchmark(tmp_path / "questions" / "yes_no.json", "/v", "official", tasks=["yes_no"]).load()
    assert len(one) == 61  # meta_info.json found one folder up


def test_tempcompass_video_r1_rows_use_extras_when_present(fx, tmp_path):
    data = json.loads((fx / "tempcompass_sample.json").read_text())
    rows = []
    for vid, dims in data["multi-choice"].items():  # a Video-R1-style conversion of the multi-choice task
        for dim, questions in dims.items():
            for q in questions:
                lines = q["question"].split("\n")
                rows.append({"problem_id": len(rows) + 1, "problem": lines[0], "options": lines[1:], "dim": dim,
                             "data_type": "video", "problem_type": "multiple choice",
                             "solution": f"<answer>{q['answer'][0]}</answer>",
                             "path": f"./Evaluation/TempCompass/videos/{vid}.mp4"})
    path = tmp_path / "eval_tempcompass.json"
    path.write_text(json.dumps(rows))
    bench = TempCompassBenchmark(path, "/data/Evaluation")
    items = bench.load()
    assert len(items) == 32 and items[0].video_path == "/data/Evaluation/TempCompass/videos/1034419625.mp4"
    assert bench.breakdown_keys(items[0]) == {"dimension": "action", "task_type": "unknown", "fine_type": "unknown"}
    assert bench.score("A", items[0]) == 1.0 and bench.score("A. dunking a basketball", items[0]) == 0.0


def test_tempcompass_captioning_is_refused():
    with pytest.raises(ValueError, match="captioning.*LLM judge"):
        TempCompassBenchmark("x.json", "/v", "official", tasks=["multi-choice", "captioning"])


def test_schema_errors_name_file_row_and_field(fx, tmp_path):
    rows = json.loads((fx / "videomme_sample.json").read_text())
    del rows[3]["duration"]
    path = tmp_path / "mme.json"
    path.write_text(json.dumps(rows))
    for fmt in ("video_r1", "official"):
        with pytest.raises(SchemaError, match=r"mme\.json: row 3: field 'duration'"):
            get_benchmark("videomme")(path, "/v", fmt).load()
    rows = json.loads((fx / "videoholmes_sample.json").read_text())
    rows[4]["Answer"] = "G"
    path = tmp_path / "holmes.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(SchemaError, match=r"holmes\.json: row 4: field 'Answer': 'G' is not one of the options"):
        get_benchmark("videoholmes")(path, "/v", "official").load()
    rows = json.loads((fx / "mmvu_videor1_format_sample.json").read_text())
    rows[7]["options"] = None
    path = tmp_path / "mmvu_r1.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(SchemaError, match=r"mmvu_r1\.json: row 7: field 'options'"):
        get_benchmark("mmvu")(path, "/v").load()
    rows = json.loads((fx / "videommmu_sample.json").read_text())
    rows[4]["problem_id"] = rows[3]["problem_id"]
    path = tmp_path / "dup.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(SchemaError, match="question id '4' appears more than once"):
        get_benchmark("videommmu")(path, "/v").load()


def test_path_doubling_and_rebasing(tmp_path):
    assert resolve_video_path("/data/Evaluation", "./Evaluation/VideoMME/a.mp4") == "/data/Evaluation/VideoMME/a.mp4"
    assert resolve_video_path("/data/Evaluation/", "./Evaluation/VideoMME/a.mp4") == "/data/Evaluation/VideoMME/a.mp4"
    assert resolve_video_path("/data", "./Evaluation/VideoMME/a.mp4") == "/data/Evaluation/VideoMME/a.mp4"
    mmvu = resolve_video_path("/data/Evaluation/MMVU", "./Evaluation/MMVU/videos/Art/0.mp4")
    assert mmvu == "/data/Evaluation/MMVU/videos/Art/0.mp4"  # two folders overlap
    assert resolve_video_path("/v", "/nas-ssd2/x/Video-Holmes/videos/b.mp4") == "/v/b.mp4"
    assert resolve_video_path(None, "/nas/b.mp4") == "/nas/b.mp4"
    # A file name never counts as an overlapping folder.
    assert resolve_video_path("/data/Evaluation", "Evaluation.mp4") == "/data/Evaluation/Evaluation.mp4"
    # The layout the released script expects (<root>/Evaluation/Evaluation/...) is used when only it exists.
    root = tmp_path / "Evaluation"
    doubled = root / "Evaluation" / "VideoMME" / "a.mp4"
    doubled.parent.mkdir(parents=True)
    doubled.write_bytes(b"")
    assert resolve_video_path(root, "./Evaluation/VideoMME/a.mp4") == str(doubled)
    single = root / "VideoMME" / "a.mp4"
    single.parent.mkdir()
    single.write_bytes(b"")
    assert resolve_video_path(root, "./Evaluation/VideoMME/a.mp4") == str(single)


def test_eval_package_does_not_import_lightning():
    code = ("import sys, ktr.eval; "
            "assert not any(m.split('.')[0] in ('lightning', 'pytorch_lightning') for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)

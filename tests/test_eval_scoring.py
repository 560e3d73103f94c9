"""Scoring, aggregation (both denominators, breakdowns, multi-rank merge) and predictions resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ktr.eval import (
    EvalItem,
    append_prediction,
    get_benchmark,
    load_predictions,
    pending_items,
    prompt_hash,
    summarize,
)
from ktr.eval.benchmarks import mean_relative_accuracy, score_video_r1
from ktr.eval.benchmarks.videommmu import VideoMMMUBenchmark, score_open
from tests import FIXTURES as FIXTURES_ROOT

FIXTURES = FIXTURES_ROOT / "benchmarks"


@pytest.fixture(scope="module")
def fx() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"benchmark fixtures not found at {FIXTURES}")
    return FIXTURES


def _items(fx: Path, name: str, file: str, fmt: str) -> tuple:
    bench = get_benchmark(name)(fx / file, "/data/Evaluation", fmt)
    return bench, {it.qid: it for it in bench.load()}


# ------------------------------------------------------------------------------------------- Video-R1


def test_video_r1_scores_real_outputs_like_the_logs(fx):
    logs = json.loads((fx / "videor1_style_model_outputs_sample.json").read_text())
    mmvu, mmvu_items = _items(fx, "mmvu", "mmvu_videor1_format_sample.json", "video_r1")
    mme, mme_items = _items(fx, "videomme", "videomme_sample.json", "video_r1")
    records = {"mmvu": [], "videomme": []}
    for row in logs:
        is_mme = "question_id" in row["question"]
        bench, items = (mme, mme_items) if is_mme else (mmvu, mmvu_items)
        item = items[str(row["question"]["problem_id"])]
        assert item.prompt_text.startswith(row["question"]["problem"])  # the log row is this item
        rec = bench.evaluate(row["model_output"], item, prompt_hash(item.prompt_text))
        assert rec["score"] == row["accuracy_score"]
        records["videomme" if is_mme else "mmvu"].append(rec)
    s = summarize(records["mmvu"])
    assert (s["overall"], s["n_scored"], s["n_unparsable"]) == (3 / 8, 8, 0)
    # Problems 1-4 are Science (scores 0, 1, 0, 0), 5-8 Engineering (1, 1, 0, 0).
    assert s["breakdown"]["discipline"]["Science"] == {"acc": 0.25, "n": 4, "acc_answered": 0.25, "n_answered": 4}
    assert s["breakdown"]["discipline"]["Engineering"]["acc"] == 0.5
    assert s["breakdown"]["subject"]["Mechanical Engineering"]["n"] == 3  # problems 5, 6 and 8
    s = summarize(records["videomme"])
    assert s["overall"] == 0.75 and s["extraction_steps"] == {"whole_output": 4}
    assert s["breakdown"]["task_type"] == {
        "Counting Problem": {"acc": 0.5, "n": 2, "acc_answered": 0.5, "n_answered": 2},
        "Information Synopsis": {"acc": 1.0, "n": 1, "acc_answered": 1.0, "n_answered": 1},
        "Object Recognition": {"acc": 1.0, "n": 1, "acc_answered": 1.0, "n_answered": 1},
    }


def test_video_r1_scoring_rules():
    assert score_video_r1("C.", "C", "multiple choice") == 0.0  # exact match only
    assert score_video_r1(" C ", "C", "multiple choice") == 1.0
    assert score_video_r1("c", "C", "multiple choice") == 0.0  # case-sensitive
    assert score_video_r1(None, "C", "multiple choice") == 0.0
    assert score_video_r1("12.970", "12.97", "numerical") == 1.0
    assert score_video_r1("13", "12.97", "numerical") == 0.0  # only one has a decimal point
    assert score_video_r1("1,000", "1000.0", "numerical") == 1.0
    assert score_video_r1("8", "10", "regression") == pytest.approx(0.6)  # 0.2 < 1 - t for t <= 0.75
    # On the boundary the reference's float32 arithmetic decides: 0.1 < 1 - 0.9 there, so 9 of 10.
    assert score_video_r1("9", "10", "regression") == pytest.approx(0.9)
    assert score_video_r1("about nine", "10", "regression") == 0.0
    # Relative error 0.25 passes thresholds 0.50..0.70 (1 - t > 0.25): 5 of 10.
    assert mean_relative_accuracy(7.5, 10.0) == 0.5
    assert mean_relative_accuracy(5.0, 10.0) == 0.0 and mean_relative_accuracy(10.0, 10.0) == 1.0


def test_video_r1_numerical_row_of_videommmu(fx):
    bench, items = _items(fx, "videommmu", "videommmu_sample.json", "video_r1")
    item = items["14"]  # gold 12.97
    assert bench.evaluate("<think>0.175 mol x 74.093</think><answer>12.97</answer>", item)["score"] == 1.0
    assert bench.evaluate("<answer>12.966</answer>", item)["score"] == 1.0  # equal after rounding to 2 decimals
    assert bench.evaluate("<answer>13</answer>", item)["score"] == 0.0


# ------------------------------------------------------------------------------------------- official


def test_videomme_official_both_denominators(fx):
    bench, items = _items(fx, "videomme", "videomme_sample.json", "official")
    outputs = {"001-1": "The best answer is C.",  # gold C: right
               "001-2": "I really cannot tell what kind of video this is from the frames given to me",  # none
               "001-3": "B",  # gold D: wrong
               "002-1": "C. the flag"}  # gold C: right
    records = [bench.evaluate(out, items[qid]) for qid, out in outputs.items()]
    records.append(bench.skipped(items["002-2"], "video not found"))
    s = summarize(records)  # the skipped question counts as wrong, as in the official scripts
    assert (s["overall"], s["overall_answered"], s["overall_readable"]) == (2 / 5, 2 / 3, 2 / 4)
    assert (s["n_questions"], s["n_scored"], s["n_unparsable"], s["n_skipped"]) == (5, 4, 1, 1)
    assert s["skipped"] == [{"qid": "002-2", "reason": "video not found"}]
    assert s["breakdown"]["duration"]["short"] == {"acc": 0.4, "n": 5, "acc_answered": 2 / 3, "n_answered": 3}
    assert s["extraction_steps"] == {"letter": 3, "none": 1}


def test_videoholmes_official_counts_bare_letter_decisions(fx):
    bench, items = _items(fx, "videoholmes", "videoholmes_sample.json", "official")
    outputs = {"RSmjqss0XKQ/1": "<think>uniforms</think><answer>A</answer>",  # gold A, bare letter
               "RSmjqss0XKQ/2": "<answer>B: to fix the lift</answer>",  # gold B, pattern
               "RSmjqss0XKQ/3": "<answer>E</answer>",  # gold C
               "RSmjqss0XKQ/4": "no idea"}  # gold A; no letter at all
    s = summarize([bench.evaluate(out, items[q]) for q, out in outputs.items()])
    assert s["overall"] == 0.5 and s["n_unparsable"] == 1
    assert s["extraction_steps"] == {"none": 1, "tag/bare_letter": 2, "tag/pattern": 1}
    assert s["breakdown"]["question_type"]["SR"]["acc"] == 1.0 and s["breakdown"]["question_type"]["TCI"]["acc"] == 0.0


def test_tempcompass_official_rule_scoring_and_unmatched(fx):
    bench, items = _items(fx, "tempcompass", "tempcompass_sample.json", "official")
    cases = [("multi-choice/1034419625/action/1", "C", 1.0),  # answer "C. dunking a basketball"
             ("multi-choice/1034419625/action/2", "A. passing a basketball", 0.0),  # "B. dunking ..."
             ("yes_no/1034419625/action/0", "Yes.", 1.0),  # "yes"
             ("yes_no/1034419625/action/1", "It seems so", 0.0),  # "yes", unmatched
             ("caption_matching/1034419625/action/0", "Option 2", 1.0),  # "Option 2: A man is dunking ..."
             ("caption_matching/1034419625/action/1", "A man is dunking a basketball.", 1.0)]  # "Sentence A: ..."
    records = [bench.evaluate(out, items[qid]) for qid, out, _ in cases]
    assert [r["score"] for r in records] == [score for _, _, score in cases]
    s = summarize(records)
    assert s["n_unparsable"] == 1  # "It seems so": the official pipeline would ask an LLM judge
    assert s["breakdown"]["task_type"]["multi-choice"]["acc"] == 0.5
    assert s["breakdown"]["fine_type"]["fine-grained action"]["n"] == 6


def test_mmvu_official_rule(fx):
    bench, items = _items(fx, "mmvu", "mmvu_sample.json", "official")
    item = items["validation_1"]  # gold A = 10.0
    assert bench.evaluate("0.1 mol CaCO3 ... Therefore, the final answer is: A", item)["score"] == 1.0
    rec = bench.evaluate("The mass is 10.0 g, which is listed among the options", item)
    assert (rec["extracted"], rec["step"]) == ("A", "option_text")
    rec = bench.evaluate("I cannot see the video", item)
    assert (rec["parsed"], rec["score"]) == (False, 0.0)


def test_videommmu_official_open_and_choice(tmp_path):
    rows = [{"id": "validation_Chemistry_13", "question": "Mass?", "question_type": "open", "answer": "12.97"},
            {"id": "dev_Biology_3", "question": "Sugar?", "question_type": "multiple-choice",
             "options": ["aldose", "ketose", "glucose", "fructose"], "answer": "A"}]
    path = tmp_path / "adaptation.json"
    path.write_text(json.dumps(rows))
    bench = VideoMMMUBenchmark(path, "/v", "official", track="Adaptation")
    open_q, mc = bench.load()
    assert open_q.prompt_text.startswith("Please directly output the option letter/data as the answer. You should")
    assert bench.evaluate("the mass is 12.970 g", open_q)["score"] == 1.0
    assert bench.evaluate("the mass is 13 g", open_q)["score"] == 0.0
    assert bench.evaluate("The answer is (A)", mc)["score"] == 1.0
    assert bench.evaluate("<answer>A</answer>", mc)["parsed"] is False  # no letter form: wrong, no guess
    assert score_open("it is Mitosis.", "mitosis") == 1.0


# --------------------------------------------------------------------------------------- aggregation


def _rec(qid: str, score: float | None, parsed: bool, group: str, skipped: str | None = None, step: str = "s") -> dict:
    return {"qid": qid, "score": score, "parsed": parsed, "keys": {"g": group}, "skipped": skipped, "step": step}


def test_summarize_hand_computed():
    records = [_rec("1", 1.0, True, "x"), _rec("2", 0.0, True, "x"), _rec("3", 0.0, False, "y", step="none"),
               _rec("4", 0.5, True, "y"), _rec("5", None, False, "y", skipped="unreadable video"),
               _rec("1", 0.0, True, "x")]  # a padded repeat of qid 1: the first one counts
    s = summarize(records, excluded={"open-ended": 2})
    assert s["overall"] == pytest.approx(1.5 / 5) and s["overall_answered"] == pytest.approx(1.5 / 3)
    assert s["overall_readable"] == pytest.approx(1.5 / 4)
    assert (s["n_scored"], s["n_skipped"], s["n_unparsable"], s["n_duplicates"]) == (4, 1, 1, 1)
    assert s["breakdown"]["g"]["x"] == {"acc": 0.5, "n": 2, "acc_answered": 0.5, "n_answered": 2}
    assert s["breakdown"]["g"]["y"] == {"acc": 0.5 / 3, "n": 3, "acc_answered": 0.5, "n_answered": 1}
    assert s["extraction_steps"] == {"none": 1, "s": 3} and s["excluded"] == {"open-ended": 2}
    assert summarize([])["overall"] is None


def test_multi_rank_merge_equals_single_process():
    records = [_rec(str(i), float(i % 3 == 0), i % 5 != 0, "abc"[i % 3]) for i in range(23)]
    # Two ranks, strided as a distributed sampler shards, the shorter one padded with a repeat.
    rank0, rank1 = records[0::2], records[1::2] + [records[1]]
    merged = summarize(rank1 + rank0)
    single = summarize(records)
    assert merged == {**single, "n_duplicates": 1}
    assert merged["n_scored"] == 23


# ------------------------------------------------------------------------------------ predictions.jsonl


def _item(qid: str, prompt: str = "p") -> EvalItem:
    return EvalItem(qid=qid, video_path="/v.mp4", prompt_text=prompt, answer="A", problem_type="multiple choice")


def test_predictions_resume_with_truncated_last_line(tmp_path):
    path = tmp_path / "eval" / "videomme" / "predictions.jsonl"
    items = [_item(str(i)) for i in range(5)]
    for it in items[:3]:
        record = {"qid": it.qid, "prompt_hash": prompt_hash(it.prompt_text), "score": 1.0, "skipped": None}
        append_prediction(path, record)
    with path.open("a") as f:  # a write cut short by a crash
        f.write('{"qid": "3", "prompt_h')
    done = load_predictions(path)
    assert sorted(done) == ["0", "1", "2"]
    assert [it.qid for it in pending_items(items, done)] == ["3", "4"]
    load_predictions(path, repair=True)
    assert path.read_text().endswith("1.0, \"skipped\": null}\n")
    append_prediction(path, {"qid": "3", "prompt_hash": prompt_hash("p"), "score": 0.0, "skipped": None})
    assert sorted(load_predictions(path)) == ["0", "1", "2", "3"]


def test_pending_items_retries_skipped_and_changed_prompts(tmp_path):
    done = {"0": {"qid": "0", "prompt_hash": prompt_hash("p"), "skipped": None},
            "1": {"qid": "1", "prompt_hash": prompt_hash("p"), "skipped": "video not found"},
            "2": {"qid": "2", "prompt_hash": prompt_hash("old prompt"), "skipped": None}}
    assert [it.qid for it in pending_items([_item("0"), _item("1"), _item("2"), _item("3")], done)] == ["1", "2", "3"]


def test_load_predictions_errors_and_edge_cases(tmp_path):
    path = tmp_path / "p.jsonl"
    assert load_predictions(path) == {}
    path.write_text('{"qid": "a"}\nnot json\n{"qid": "b"}\n')
    with pytest.raises(ValueError, match=r"p\.jsonl: line 2: invalid JSON"):
        load_predictions(path)
    path.write_text('{"qid": "a", "score": 0}\n{"qid": "a", "score": 1}')  # complete last line without newline
    assert load_predictions(path, repair=True) == {"a": {"qid": "a", "score": 1}}
    assert path.read_text().endswith("}\n")

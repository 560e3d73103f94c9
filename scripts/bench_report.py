"""Cost of one key-token report page: building its data, rendering, writing (page + JSON) and page size.

    python scripts/bench_report.py [--prompts 2] [--group 8] [--lengths 20 768] [--json report_bench.json]

Completions are random token ids of the real Qwen vocabulary (no model); masks come from the real selection on
random scores, so the page has the released ~20% per signal. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import torch

from ktr.config import SIGNALS, KeyTokenConfig
from ktr.model.tokenizer import build_qwen2_tokenizer
from ktr.probes.keytokens import select_key_tokens
from ktr.report.record import StepRecord, report_data, thumbnails
from ktr.report.write import write_index, write_report
from ktr.types import Media, PromptBatch, Rollout


def record(b: int, g: int, t: int, seed: int = 0) -> StepRecord:
    gen = torch.Generator().manual_seed(seed)
    n = b * g
    ids = torch.randint(0, 150000, (n, t), generator=gen)  # [N, T] ordinary tokens
    valid = torch.ones(n, t, dtype=torch.bool)
    scores = {s: torch.randn(n, t, generator=gen) for s in SIGNALS}
    key = select_key_tokens(scores, valid, torch.ones(n, dtype=torch.bool), KeyTokenConfig(), g)
    frames = torch.randint(0, 255, (16, 3, 224, 224), dtype=torch.uint8, generator=gen)
    prompts = PromptBatch(rows=[{"problem": "Q?", "problem_type": "free-form"}] * b,
                          input_ids=torch.zeros(b, 1, dtype=torch.long), attention_mask=torch.ones(b, 1),
                          mm_token_type_ids=torch.zeros(b, 1, dtype=torch.int),
                          media=[Media("video", frames, 2.0, "v.mp4")] * b, pixel_values=torch.zeros(0, 1),
                          grid_thw=torch.ones(b, 3, dtype=torch.long), second_per_grid_ts=torch.ones(b))
    ro = Rollout(g, ids, valid.long(), torch.zeros_like(ids, dtype=torch.int), ids, valid)
    r = torch.rand(n, generator=gen)
    return StepRecord(0, prompts, ro, key, r, {"accuracy": r}, r - r.mean())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--lengths", type=int, nargs="+", default=[20, 768])
    p.add_argument("--json", default="report_bench.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    tok = build_qwen2_tokenizer()
    rows = []
    for t in args.lengths:
        rec = record(args.prompts, args.group, t)
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            data = report_data(rec, tok, KeyTokenConfig())
            t1 = time.perf_counter()
            thumbs = [thumbnails(m) for m in rec.prompts.media]
            t2 = time.perf_counter()
            page = write_report(data, thumbs, out, "step")
            write_index(out)
            t3 = time.perf_counter()
            size = page.stat().st_size, page.with_suffix(".json").stat().st_size
        rows.append({"tokens_per_completion": t, "completions": args.prompts * args.group,
                     "data_s": t1 - t0, "thumbnails_s": t2 - t1, "render_write_s": t3 - t2, "total_s": t3 - t0,
                     "html_kb": size[0] / 1024, "json_kb": size[1] / 1024})
    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}, torch {torch.__version__}, 1 thread")
    print("| tokens | completions | data s | thumbnails s | render+write s | total s | html KB | json KB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens_per_completion']} | {r['completions']} | {r['data_s']:.3f} | {r['thumbnails_s']:.3f} | "
              f"{r['render_write_s']:.3f} | {r['total_s']:.3f} | {r['html_kb']:.0f} | {r['json_kb']:.0f} |")
    with open(args.json, "w") as f:
        json.dump({"machine": platform.platform(), "torch": torch.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()

"""How much does bf16 move the key-token masks, and how much of that is the head's logit rounding?

    python scripts/mask_precision.py --json docs/mask_precision.json

On GPUs ktr scores in bf16 (`bf16-mixed`, QLoRA's bf16 compute). The probes' scores are differences of log-probs,
and selection keeps the tokens above a quantile, so rounding noise can decide which tokens get gradient. This
script measures it on a CPU. A tiny Qwen2.5-VL (hidden 128, 4 layers, the real vocabulary) is trained by SFT on the
planted completions of `scripts/probe_accuracy.py` for `--steps` steps (a model whose logits are peaked like a
trained one's); the trained policy samples G = 8 completions (temperature 1, 40 new tokens) for 4 held-out video
prompts; then the key tokens of that rollout (`ktr.probes.keytokens.attribute`, the default Video-KTR settings:
visual, temporal and entropy at ratio 0.2, contexts tied, the same temporal draw) are computed six ways: float32,
and a bf16 copy of the weights with `policy.head_logits: compute` (the head's product rounded to bf16, as
transformers' `lm_head` and the released code) and `float32` (ktr's default: rounded to float32 only), each in the
naive layout (G rows, as released) and ktr's shared-prefix layout (split attention).

For each, the number of mask entries that differ from the float32 naive masks (the exact selection) per signal and
in the union `M`, and the entries that differ between the two layouts at the same precision. Rows: one per
(`--steps`, `--seeds`) pair; the seed sets the model's initialisation, the held-out prompts and the sampled
completions (the SFT items are the same).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_accuracy import samples, sft  # noqa: E402  (scripts/, the planted SFT task)

from ktr.config import KeyTokenConfig, PolicyConfig, SamplingConfig, TinyModelConfig  # noqa: E402
from ktr.experiments.machine import describe  # noqa: E402
from ktr.model.forward import (PolicyPass, SequenceView, completion_hidden, completion_logps,  # noqa: E402
                               encode_media, set_head_logits)
from ktr.model.policy import load_policy  # noqa: E402
from ktr.probes.keytokens import KeyTokens, attribute  # noqa: E402
from ktr.rollout.hf import generate  # noqa: E402

VARIANTS = ("float32", "bf16/compute", "bf16/float32")
LAYOUTS = ("naive", "split")
SIGNALS = ("visual", "temporal", "entropy", "union")


def key_tokens(model, processor, batch, rollout, shared: bool, cfg: KeyTokenConfig) -> KeyTokens:
    ids, valid = rollout.completion_ids, rollout.completion_mask
    with torch.no_grad():
        feats = encode_media(model, batch.pixel_values, batch.grid_thw)
        view = SequenceView.of(model, rollout, batch, shared_prefix=shared)
        hidden = completion_hidden(model, view, feats, ids.shape[1])
        logps, entropy = completion_logps(model, hidden, ids, valid, 512, with_entropy=True)
        torch.manual_seed(7)  # the temporal probe's shuffle: the same draw for every variant
        return attribute(model, processor, batch, rollout, PolicyPass(view, feats, logps, entropy), cfg, 512)


def differ(a: KeyTokens, b: KeyTokens) -> dict[str, int]:
    out = {s: int((a.masks[s] != b.masks[s]).sum()) for s in SIGNALS[:-1]}
    out["union"] = int((a.mask != b.mask).sum())
    return out


def one_run(steps: int, seed: int) -> dict:
    policy = load_policy(PolicyConfig(name_or_path="tiny", attn_implementation="sdpa", tiny=TinyModelConfig(
        hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=256, seed=seed)))
    history = sft(policy, steps, 8, 3e-3, log_every=max(steps, 1))
    model, processor = policy.model, policy.processor
    batch = processor.collate(samples(processor, 10_000 + 100 * seed, 4)[0])
    torch.manual_seed(seed + 1)
    rollout = generate(model, processor, batch, SamplingConfig(group_size=8, max_new_tokens=40, top_p=1.0))
    models = {"float32": model}
    for mode in ("compute", "float32"):
        m = copy.deepcopy(model).to(torch.bfloat16)
        set_head_logits(m, mode)
        models[f"bf16/{mode}"] = m
    cfg = KeyTokenConfig()
    keys = {(v, lay): key_tokens(models[v], processor, batch, rollout, lay == "split", cfg)
            for v in VARIANTS for lay in LAYOUTS}
    exact = keys[("float32", "naive")]
    valid = rollout.completion_mask
    return {
        "steps": steps, "seed": seed, "sft_final_loss": history[-1]["loss"], "valid_tokens": int(valid.sum()),
        "selected": {**{s: int(exact.masks[s].sum()) for s in SIGNALS[:-1]}, "union": int(exact.mask.sum())},
        "vs_float32_naive": {f"{v} {lay}": differ(keys[(v, lay)], exact) for v in VARIANTS for lay in LAYOUTS
                             if (v, lay) != ("float32", "naive")},
        "split_vs_naive": {v: differ(keys[(v, "split")], keys[(v, "naive")]) for v in VARIANTS},
    }


def table(rows: list[dict]) -> str:
    lines = ["| SFT steps | seed | valid tokens | union selected (float32) | against float32 naive: "
             "bf16/compute naive | bf16/compute split | bf16/float32 naive | bf16/float32 split | float32 split | "
             "split vs naive: float32 | bf16/compute | bf16/float32 |", "|" + "---:|" * 12]
    for r in rows:
        v, s = r["vs_float32_naive"], r["split_vs_naive"]

        def cell(d):
            return f"{d['union']} ({d['visual']}/{d['temporal']}/{d['entropy']})"

        lines.append(f"| {r['steps']} | {r['seed']} | {r['valid_tokens']} | {r['selected']['union']} | "
                     f"{cell(v['bf16/compute naive'])} | {cell(v['bf16/compute split'])} | "
                     f"{cell(v['bf16/float32 naive'])} | {cell(v['bf16/float32 split'])} | "
                     f"{cell(v['float32 split'])} | "
                     f"{cell(s['float32'])} | {cell(s['bf16/compute'])} | {cell(s['bf16/float32'])} |")
    totals = {k: sum(r["vs_float32_naive"][k]["union"] for r in rows) for k in rows[0]["vs_float32_naive"]}
    valid = sum(r["valid_tokens"] for r in rows)
    lines.append("")
    lines.append("Union entries differing from the float32 naive masks, all rows: " + ", ".join(
        f"{k} {n} ({100 * n / valid:.1f}% of {valid} tokens)" for k, n in totals.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, nargs="+", default=[40, 150], help="SFT steps before scoring")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    rows = []
    for steps in args.steps:
        for seed in args.seeds:
            rows.append(one_run(steps, seed))
            print(f"steps {steps} seed {seed}: {rows[-1]['vs_float32_naive']}", flush=True)
    text = table(rows)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"machine": describe(), "seconds": round(time.time() - start, 1),
                                         "args": vars(args) | {"json": str(args.json)}, "rows": rows,
                                         "table": text}, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Do the probes find the tokens that depend on the video and on frame order? Planted ground truth (issue 17).

The `third` synthetic clips (three of four colours in sequence) get the planted completion of
`ktr.data.planted` ("<think>colours: blue, green, red. order: red, blue, green.</think><answer>B</answer>"),
whose tokens carry exact labels: `content` (hiding the video can change them) and `order` (only frame order can).
The tiny policy is trained by SFT on these completions, then held-out completions are scored under teacher
forcing with each probe (visual: media hidden by attention mask; temporal: frames shuffled; entropy; and a
uniform random score as the baseline), for the trained model and for the same model untrained (random init).
`--draws K ...` also scores each random perturbation averaged over K draws (`key_tokens.SIGNAL.draws`).

Per (model, signal, label): AUROC of the score over all valid completion tokens of the held-out set, and
precision at the configured ratio (the tokens `select_top_ratio` keeps per completion: G = 1 here, so the
pool is the sequence). `oracle` is the precision a perfect score would get with the same selected counts.

    python scripts/probe_accuracy.py --json docs/probe_accuracy.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from ktr.config import RANDOM_TEMPORAL, RANDOM_VISUAL, PolicyConfig, TinyModelConfig
from ktr.data.planted import LABELS, planted_target, token_labels
from ktr.data.prompts import build_messages
from ktr.data.synthetic import SyntheticSpec, make_item
from ktr.data.video import VideoSettings, frames_from_array
from ktr.experiments.machine import describe
from ktr.model.forward import SequenceView, completion_hidden, completion_logps, encode_media
from ktr.model.policy import load_policy
from ktr.probes.select import select_top_ratio
from ktr.probes.temporal import TEMPORAL_PERTURBATIONS, temporal_scores
from ktr.probes.visual import VISUAL_PERTURBATIONS, visual_scores
from ktr.rollout.base import teacher_rollout
from ktr.types import Media

SPEC = SyntheticSpec(kinds=("third",), num_frames=6)  # 6 frames: each colour one temporal patch
VIDEO = VideoSettings(fps=4.0, min_frames=4, max_frames=8, min_pixels=3136, max_pixels=3136)
TINY = TinyModelConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)
SIGNALS = ("visual", "temporal", "entropy", "random")
EVAL_START = 10_000_000  # held-out indices, as SyntheticDataModule.val_rows


def samples(processor, start: int, n: int, data_seed: int = 0):
    """Encoded prompts with planted targets, and their labels `{label: [T] bool}`."""
    tok = processor.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    out, labels = [], []
    for i in range(start, start + n):
        row, frames = make_item(data_seed, i, SPEC)
        clip = frames_from_array(frames, SPEC.fps, VIDEO)
        media = Media("video", clip.frames, clip.sample_fps, row["path"])
        target = planted_target(row["colours"])
        s = processor.encode(build_messages(row), media, row=row, target=target)
        lab = token_labels(row["colours"], lambda t: tok(t, add_special_tokens=False)["input_ids"], [end])
        if len(lab["content"]) != len(s.target_ids):
            raise ValueError(f"labels of {row['problem_id']} have {len(lab['content'])} tokens, target "
                             f"{len(s.target_ids)}")
        out.append(s)
        labels.append({k: torch.tensor(v) for k, v in lab.items()})
    return out, labels


def teacher_pass(model, processor, batch, with_grad: bool = False):
    rollout = teacher_rollout(batch, processor)
    with torch.set_grad_enabled(with_grad):
        feats = encode_media(model, batch.pixel_values, batch.grid_thw)
        view = SequenceView.of(model, rollout, batch)
        hidden = completion_hidden(model, view, feats, rollout.completion_ids.shape[1])
    return rollout, feats, view, hidden


def sft(policy, steps: int, batch_size: int, lr: float, log_every: int = 50) -> list[dict]:
    """Teacher-forced NLL of the planted completions, AdamW, fresh training items every step."""
    model, proc = policy.model, policy.processor
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    history = []
    for step in range(steps):
        batch = proc.collate(samples(proc, step * batch_size, batch_size)[0])
        rollout, _, _, hidden = teacher_pass(model, proc, batch, with_grad=True)
        logps, _ = completion_logps(model, hidden, rollout.completion_ids, rollout.completion_mask, 512)
        mask = rollout.completion_mask
        loss = -(logps * mask).sum() / mask.sum()  # [N, T] -> scalar
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            history.append({"step": step, "loss": loss.item()})
            print(f"sft step {step:4d} loss {loss.item():.4f}", flush=True)
    model.eval()
    return history


def auroc(scores: Tensor, labels: Tensor) -> float:
    """Mann-Whitney AUROC with ties counted half (`scores`, `labels` 1-D). NaN without both classes."""
    pos, neg = int(labels.sum()), int((~labels).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    s = scores.double()
    _, inverse, counts = torch.unique(s, return_inverse=True, return_counts=True)  # sorted unique values
    first = torch.cumsum(counts, 0) - counts  # 0-based rank of each value's first occurrence
    ranks = (first + (counts + 1) / 2.0)[inverse]  # average 1-based rank of tied values
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


@torch.no_grad()
def score_heldout(policy, n: int, batch_size: int, seed: int, visual: tuple[str, ...] = ("attention_mask",),
                  temporal: tuple[str, ...] = ("shuffle",), draws: tuple[int, ...] = (1,),
                  ) -> tuple[dict[tuple, list[Tensor]], dict, list[Tensor]]:
    """Per (signal, perturbation, draws) the scores of every held-out completion, the labels, and the valid masks
    (lists over batches). `visual` / `temporal`: the perturbations scored (registries of `ktr.probes`); a random
    one is scored once per entry of `draws` (`SignalConfig.draws`: the score averaged over that many draws)."""
    model, proc = policy.model, policy.processor
    gen = torch.Generator().manual_seed(seed)
    ks = lambda p, random: draws if p in random else (1,)
    keys = ([("visual", v, d) for v in visual for d in ks(v, RANDOM_VISUAL)]
            + [("temporal", t, d) for t in temporal for d in ks(t, RANDOM_TEMPORAL)]
            + [("entropy", "", 1), ("random", "", 1)])
    out: dict[tuple, list[Tensor]] = {k: [] for k in keys}
    labels: dict[str, list[Tensor]] = {k: [] for k in LABELS}
    valids, stats = [], {"target_top_all": [], "target_top_content": []}
    for start in range(0, n, batch_size):
        items, labs = samples(proc, EVAL_START + start, min(batch_size, n - start))
        batch = proc.collate(items)
        rollout, feats, view, hidden = teacher_pass(model, proc, batch)
        ids, valid = rollout.completion_ids, rollout.completion_mask  # [N, T]
        logps, ent = completion_logps(model, hidden, ids, valid, 512, with_entropy=True)
        for sig, pert, d in keys:
            if sig == "visual":
                out[sig, pert, d].append(visual_scores(model, batch, view, feats, ids, valid, logps, pert,
                                                       generator=gen, draws=d))
            elif sig == "temporal":
                out[sig, pert, d].append(temporal_scores(model, proc, batch, view, feats, ids, valid, logps, pert,
                                                         generator=gen, draws=d))
        out["entropy", "", 1].append(ent.masked_fill(~valid, 0.0))
        out["random", "", 1].append(torch.rand(ids.shape, generator=gen))
        for k in LABELS:
            lab = torch.zeros_like(valid)
            for i, v in enumerate(labs):
                lab[i, : len(v[k])] = v[k]
            labels[k].append(lab)
        # does the model know the answer? argmax == target, over all and over labelled tokens
        argmax = (logps > -0.6931).logical_and(valid)  # p(target) > 1/2, so the target token is the argmax
        stats["target_top_all"].append(argmax[valid].float().mean())
        content = labels["content"][-1]
        stats["target_top_content"].append(argmax[content].float().mean())
        valids.append(valid)
    acc = {k: float(torch.stack(v).mean()) for k, v in stats.items()}
    return out, labels, valids, acc


def metrics(scores, labels, valids, ratio: float, model_name: str) -> list[dict]:
    records = []
    for (sig, pert, draws), per_batch in scores.items():
        for lab in LABELS:
            flat_s = torch.cat([s[v] for s, v in zip(per_batch, valids)])
            flat_l = torch.cat([l[v] for l, v in zip(labels[lab], valids)])
            sel_hits = sel_n = oracle_hits = 0
            for s, l, v in zip(per_batch, labels[lab], valids):
                sel = select_top_ratio(s, v, ratio, group_size=1)  # [N, T] per-sequence pool (G = 1)
                sel_hits += int((sel & l).sum())
                sel_n += int(sel.sum())
                oracle_hits += int(torch.minimum(sel.sum(-1), (l & v).sum(-1)).sum())
            records.append({"model": model_name, "signal": sig, "perturbation": pert, "draws": draws, "label": lab,
                            "auroc": auroc(flat_s, flat_l),
                            "precision_at_ratio": sel_hits / max(1, sel_n), "ratio": ratio,
                            "n_tokens": int(flat_l.numel()), "n_positive": int(flat_l.sum()),
                            "oracle_precision": oracle_hits / max(1, sel_n)})
    return records


def table(records: list[dict], acc: dict) -> str:
    lines = ["| model | signal | perturbation | draws | label | AUROC | precision@ratio | oracle precision | "
             "positives / tokens |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['model']} | {r['signal']} | {r['perturbation'] or '-'} | {r['draws']} | {r['label']} | "
                     f"{r['auroc']:.3f} | "
                     f"{r['precision_at_ratio']:.3f} | {r['oracle_precision']:.3f} | "
                     f"{r['n_positive']} / {r['n_tokens']} |")
    lines.append("")
    lines.extend(f"- {m}: p(target token) > 1/2 (so it is the argmax) on {a['target_top_all']:.3f} of all tokens, "
                 f"{a['target_top_content']:.3f} of content tokens" for m, a in acc.items())
    return "\n".join(lines)


def spread_table(records: list[dict], seeds: list[int]) -> str:
    """Mean, min and max AUROC over the scoring seeds, per (model, signal, perturbation, label)."""
    groups: dict[tuple, list[float]] = {}
    for r in records:
        groups.setdefault((r["model"], r["signal"], r["perturbation"], r["draws"], r["label"]), []).append(r["auroc"])
    lines = [f"AUROC over {len(seeds)} scoring seeds (perturbation draws) {seeds}:", "",
             "| model | signal | perturbation | draws | label | mean | min | max |",
             "|---|---|---|---|---|---|---|---|"]
    for (m, sig, pert, d, lab), xs in groups.items():
        lines.append(f"| {m} | {sig} | {pert or '-'} | {d} | {lab} | {sum(xs) / len(xs):.3f} | {min(xs):.3f} | "
                     f"{max(xs):.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400, help="SFT steps on the planted completions")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--heldout", type=int, default=128, help="held-out completions scored")
    p.add_argument("--ratio", type=float, default=0.2, help="selection ratio (released: 0.2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--score-seeds", type=int, nargs="+", default=None,
                   help="score the held-out set once per seed (the seed of the temporal permutations and the "
                        "random score; default: --seed): the spread of each AUROC over perturbation draws")
    p.add_argument("--visual-perturbations", nargs="+", default=["attention_mask"],
                   choices=sorted(VISUAL_PERTURBATIONS),
                   help="visual perturbations scored (released: attention_mask)")
    p.add_argument("--temporal-perturbations", nargs="+", default=["shuffle"], choices=sorted(TEMPORAL_PERTURBATIONS),
                   help="temporal perturbations scored (released: shuffle)")
    p.add_argument("--draws", type=int, nargs="+", default=[1],
                   help="score each random perturbation (swap_media, random_half, the temporal shuffles) averaged "
                        "over this many draws, once per value (released: 1; key_tokens.SIGNAL.draws)")
    p.add_argument("--init-seed", type=int, default=0,
                   help="seed of the tiny model's random initialisation (policy.tiny.seed): another trained model "
                        "(SFT is deterministic given it)")
    p.add_argument("--rope-after-media", default="reference", choices=["reference", "transformers"],
                   help="policy.rope_after_media (docs/method.md section 5.4): `transformers` measures as ktr did "
                        "before 2026-12-06")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    args = p.parse_args(argv)
    perts = dict(visual=tuple(args.visual_perturbations), temporal=tuple(args.temporal_perturbations),
                 draws=tuple(args.draws))
    torch.manual_seed(args.seed)
    cfg = PolicyConfig(name_or_path="tiny", attn_implementation="sdpa", tiny=replace(TINY, seed=args.init_seed),
                       rope_after_media=args.rope_after_media)
    records, acc, t0 = [], {}, time.time()
    print(f"planted example: {planted_target(('red', 'blue', 'green'))}")
    seeds = args.score_seeds or [args.seed]
    random_policy = load_policy(cfg)
    trained = load_policy(cfg)  # the same initialisation, then SFT
    history = sft(trained, args.steps, args.batch_size, args.lr)
    for name, policy in (("random", random_policy), ("trained", trained)):
        for seed in seeds if name == "trained" else seeds[:1]:  # the random model: one draw (it is near 0.5)
            scores, labels, valids, acc[name] = score_heldout(policy, args.heldout, 32, seed, **perts)
            records += [dict(r, score_seed=seed) for r in metrics(scores, labels, valids, args.ratio, name)]
    md = table([r for r in records if r["score_seed"] == seeds[0]], acc)
    if len(seeds) > 1:
        md += "\n\n" + spread_table(records, seeds)
    print(md)
    print(f"wall {time.time() - t0:.0f} s")
    if args.json:
        machine = describe()
        for r in records:  # context for each record: how well that model knows the planted completions
            r.update({f"model_{k}": v for k, v in acc[r["model"]].items()}, sft_steps=args.steps,
                     final_sft_loss=history[-1]["loss"] if r["model"] == "trained" else None, machine=machine)
        Path(args.json).write_text(json.dumps(records, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(md + "\n")


if __name__ == "__main__":
    main()

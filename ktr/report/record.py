"""What a key-token report shows, as plain data (layer L2, no Lightning).

:class:`StepRecord` is what one RL step (or one `ktr explain` call) produced: prompts, completions,
key-token masks, raw scores and thresholds, rewards and advantages, and for `ktr explain` the noise floor
(`ktr.report.floor`). :func:`report_data` turns it into the JSON-ready dictionary that the HTML page is
rendered from and that is written beside it; the token statistics (`ktr.report.stats`) read those JSON files
back.

With a noise floor (explain pages) a token's `signals` are the signals that *mark* it (the training rule's
selection, positive and above the floor), `rule_signals` those the training rule selected, `marked` their
combination; `key` stays the training rule's key token (what training would give gradient), so `num_key`
means the same on every page and `num_marked` counts the marks.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from ktr.config import SIGNALS, KeyTokenConfig
from ktr.probes.keytokens import KeyTokens
from ktr.report.floor import NoiseFloor
from ktr.report.tokens import readable_pieces, special_ids
from ktr.types import Media, PromptBatch, Rollout

FORMAT = "ktr.key_tokens/1"
"""Value of the `format` key of every report JSON (the statistics read only files carrying it)."""


@dataclass
class StepRecord:
    """One step's data for reports: `N = B * G` completions of `B` prompts (row `i` is prompt `i // G`)."""

    step: int
    prompts: PromptBatch
    rollout: Rollout
    key: KeyTokens
    rewards: Tensor | None = None  # [N] total reward
    per_reward: dict[str, Tensor] = field(default_factory=dict)  # name -> [N]
    advantages: Tensor | None = None  # [N]
    floor: NoiseFloor | None = None  # `ktr explain`: what its page marks (`ktr.report.floor`)


def _num(x) -> float | None:
    """A JSON-safe float (NaN and infinities become null)."""
    x = float(x)
    return x if math.isfinite(x) else None


def question_text(row: dict) -> str:
    """The question as the user wrote it (problem, then the options of a multiple-choice row)."""
    text = str(row.get("problem", ""))
    options = row.get("options") or []
    if row.get("problem_type") == "multiple choice" and options:
        text += "\n" + "\n".join(str(o) for o in options)
    return text


def _completion(record: StepRecord, i: int, tokenizer, hidden: set[int]) -> dict:
    """One completion row `i`: tokens with their masks and scores, readable pieces, rewards."""
    ro, key = record.rollout, record.key
    valid = ro.completion_mask[i].cpu()  # [T]
    ids = ro.completion_ids[i].cpu()  # [T]
    masks = {s: m[i].cpu() for s, m in key.masks.items()}
    floor = record.floor
    marks = {s: m[i].cpu() for s, m in floor.masks.items()} if floor is not None else masks
    marked = floor.mask[i].cpu() if floor is not None else None
    scores = {s: v[i].detach().float().cpu() for s, v in key.scores.items()}
    kmask = key.mask[i].cpu()
    positions = [t for t in range(ids.shape[0]) if bool(valid[t])]
    tokens = []
    for t in positions:
        tid = int(ids[t])
        entry = {"pos": t, "id": tid, "special": tid in hidden, "key": bool(kmask[t]),
                 "signals": [s for s in SIGNALS if s in marks and bool(marks[s][t])],
                 "scores": {s: _num(v[t]) for s, v in scores.items()}}
        if floor is not None:
            entry["rule_signals"] = [s for s in SIGNALS if s in masks and bool(masks[s][t])]
            entry["marked"] = bool(marked[t])
        if tid in hidden:
            entry["token"] = tokenizer.convert_ids_to_tokens(tid)
        tokens.append(entry)
    pieces = readable_pieces(tokenizer, [int(ids[t]) for t in positions], positions, hidden)
    n_key = int((kmask & valid).sum())
    out = {"row": i, "text": "".join(p.text for p in pieces), "num_valid": len(positions), "num_key": n_key,
           "key_fraction": n_key / max(1, len(positions)),
           "thresholds": {s: _num(v[i]) for s, v in key.thresholds.items()},
           "tokens": tokens, "pieces": [{"text": p.text, "positions": list(p.positions)} for p in pieces],
           "reward": None if record.rewards is None else _num(record.rewards[i]),
           "rewards": {k: _num(v[i]) for k, v in record.per_reward.items()},
           "advantage": None if record.advantages is None else _num(record.advantages[i])}
    if floor is not None:
        out["num_marked"] = int((marked & valid).sum())
        out["floors"] = {s: _num(v[i]) for s, v in floor.floors.items()}
        out["pool_tokens"] = {s: int(v[i]) for s, v in floor.pool_tokens.items()}
    return out


def report_data(record: StepRecord, tokenizer, cfg: KeyTokenConfig | None = None, max_prompts: int | None = None,
                max_completions: int | None = None, kind: str = "train", title: str | None = None) -> dict:
    """The JSON-ready content of one report: the first `max_prompts` prompts, `max_completions` of each."""
    g = record.rollout.group_size
    b = len(record.prompts)
    hidden = special_ids(tokenizer)
    prompts = []
    for p in range(b if max_prompts is None else min(b, max_prompts)):
        row, media = record.prompts.rows[p], record.prompts.media[p]
        rows = range(p * g, p * g + (g if max_completions is None else min(g, max_completions)))
        prompts.append({
            "index": p, "problem_id": row.get("problem_id"), "question": question_text(row),
            "problem_type": row.get("problem_type"), "solution": row.get("solution"),
            "media": {"kind": media.kind, "path": media.path, "frames": int(media.frames.shape[0]),
                      "sample_fps": media.sample_fps},
            "completions": [_completion(record, i, tokenizer, hidden) for i in rows]})
    config = None
    if cfg is not None:
        config = {"enabled": cfg.enabled, "scope": cfg.scope, "combine": cfg.combine,
                  "ratios": {s: getattr(cfg, s).ratio for s in SIGNALS if getattr(cfg, s).enabled},
                  "visual_perturbation": cfg.visual_perturbation, "temporal_perturbation": cfg.temporal_perturbation}
    out = {"format": FORMAT, "kind": kind, "step": record.step, "group_size": g,
           "title": title or f"Key tokens, step {record.step}",
           "signals": [s for s in SIGNALS if s in record.key.masks], "config": config, "prompts": prompts}
    if record.floor is not None:
        f = record.floor
        out["noise_floor"] = {"mads": f.mads, "min_score": f.min_score, "min_pool_tokens": f.min_pool_tokens,
                              "smallest_pool": {s: int(v[v > 0].min()) for s, v in f.pool_tokens.items()
                                                if (v > 0).any()}}
    return out


def thumbnails(media: Media, max_frames: int = 16, height: int = 64) -> list[str]:
    """Frames of `media` as `data:image/png;base64,...` URIs (evenly spaced, at most `max_frames`)."""
    from PIL import Image

    frames = media.frames  # [F, 3, H, W] uint8
    f = frames.shape[0]
    idx = torch.linspace(0, f - 1, min(f, max_frames)).round().long().unique().tolist() if f else []
    out = []
    for k in idx:
        arr = frames[k].permute(1, 2, 0).contiguous().cpu().numpy()  # [H, W, 3]
        img = Image.fromarray(arr)
        w = max(1, round(img.width * height / max(1, img.height)))
        small = img.width < w  # tiny frames (the demo's 56x56) keep hard pixel edges when enlarged
        img = img.resize((w, height), Image.NEAREST if small else Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="PNG", optimize=True)
        out.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


def head_prompts(batch: PromptBatch, k: int) -> PromptBatch:
    """The first `k` prompts of `batch` (their patches, grids and padding kept as they are)."""
    if k >= len(batch):
        return batch
    n_patches = int(batch.grid_thw[:k].prod(-1).sum())
    return replace(batch, rows=batch.rows[:k], input_ids=batch.input_ids[:k], attention_mask=batch.attention_mask[:k],
                   mm_token_type_ids=batch.mm_token_type_ids[:k], media=batch.media[:k],
                   pixel_values=batch.pixel_values[:n_patches], grid_thw=batch.grid_thw[:k],
                   second_per_grid_ts=batch.second_per_grid_ts[:k],
                   target_ids=None if batch.target_ids is None else batch.target_ids[:k],
                   target_mask=None if batch.target_mask is None else batch.target_mask[:k])

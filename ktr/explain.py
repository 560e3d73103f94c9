"""`ktr explain`: which tokens of an answer depend on the video, on frame order, or are uncertain (layer L4).

    ktr explain --config configs/demo.yaml [--ckpt CKPT] --video clip.mp4 --question "..." --out DIR
    ktr explain --config ... --image photo.jpg --question "..." \
        --answer "<think>...</think><answer>B</answer>" --out DIR
    ktr explain --stats runs/demo/version_0 [--out DIR]

The policy is rebuilt from the `ktr fit` config(s) (`model.init_args.policy`, frame and pixel settings of
`data.init_args.video` / `image`, the signals of `model.init_args.key_tokens`) and the checkpoint, as `ktr test`
reads one: a Lightning `.ckpt` file or `ModelParallelStrategy` directory (weights only, `weights_only=True`),
a Hugging Face model directory (`config.json`), or a LoRA adapter directory (`adapter_config.json`, on the
config's base model). Without `--answer` the answer is generated (greedy by default); the three probes run
on it and DIR gets `report.html` (the training reports' page), `report.json`, and `answer.png`
(the highlighted answer, rendered by headless Chromium when installed; otherwise a message says so).

The page marks fewer tokens than training selects: a token is marked for a signal only when the training
rule selects it (top ratio of its pool), its score is positive, and it clears the pool's noise floor
`max(--min-score, median + --floor-mads * 1.4826 * MAD)` (`ktr.report.floor` says why). With one short
answer the pool is small; the page then says its statistics rest on too few tokens (fewer than 50), and so
does the console. The page names the checkpoint it explains (it has no training step).

`--stats RUN_DIR` reads every report JSON under RUN_DIR and writes `stats.json`, `venn.png` and `stats.html`
(selected fraction per signal, the seven-region overlap, most frequent selected words, word types when a
tagger is installed) to `--out` (default: RUN_DIR).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from ktr.answers import PROBLEM_TYPES
from ktr.config import DEFAULT_CHUNK_SIZE, KeyTokenConfig, PolicyConfig
from ktr.model.policy import Policy, load_policy
from ktr.model.trained import read_configs, settings_from_config, trained_policy, typed_section
from ktr.report.floor import MIN_SCORE, NOISE_MADS


def load_explain_policy(cfg: PolicyConfig, ckpt: str | None) -> Policy:
    """The policy of `cfg` with the weights of `ckpt` (Lightning checkpoint, HF directory or LoRA adapter)."""
    if ckpt is None:
        return load_policy(replace(cfg, gradient_checkpointing=False))
    path = Path(ckpt)
    if not path.exists():
        raise FileNotFoundError(f"--ckpt {ckpt} does not exist")
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return load_policy(replace(cfg, adapter_path=str(path), lora=None, gradient_checkpointing=False))
    if path.is_dir() and (path / "config.json").is_file():
        return load_policy(replace(cfg, name_or_path=str(path), adapter_path=None, lora=None,
                                   quantization="none", gradient_checkpointing=False))
    return trained_policy(cfg, path)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ktr explain", description="Key tokens of one answer to a question about one "
                                "video or image (report.html, report.json, answer.png), or --stats over a run.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=[], help="the `ktr fit` config(s) of the run (repeatable)")
    p.add_argument("--ckpt", help="Lightning .ckpt, ModelParallelStrategy dir, HF model dir or LoRA adapter dir")
    media = p.add_mutually_exclusive_group()
    media.add_argument("--video", help="a video file")
    media.add_argument("--image", help="an image file")
    p.add_argument("--question", help="the question about the video or image")
    p.add_argument("--problem-type", default="free-form", choices=PROBLEM_TYPES, help="answer type (prompt suffix)")
    p.add_argument("--options", nargs="*", default=[], help="options of a multiple-choice question ('A. red' ...)")
    p.add_argument("--solution", help="reference answer (e.g. B): rewards are shown when given")
    p.add_argument("--answer", help="score this answer instead of generating one")
    p.add_argument("--samples", type=int, default=1, help="answers to sample (the selection pool is all of them)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest generated answer")
    p.add_argument("--train-prompt", action="store_true", help="training wording of the prompt (default: evaluation)")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling and of the temporal probe's permutation")
    p.add_argument("--floor-mads", type=float, default=NOISE_MADS,
                   help="a marked score is this many robust SDs (1.4826 * MAD) above its pool's median")
    p.add_argument("--min-score", type=float, default=MIN_SCORE,
                   help="the noise floor's lower bound, in the score's unit (nats for log-prob differences)")
    p.add_argument("--no-png", action="store_true", help="do not render answer.png")
    p.add_argument("--stats", metavar="RUN_DIR", help="token statistics over every report under RUN_DIR")
    p.add_argument("--out", help="output directory (required unless --stats)")
    return p


def _prompt(args, processor, video, image):
    from ktr.data.base import decode_image_file, decode_video_file
    from ktr.data.prompts import build_messages

    media = decode_video_file(args.video, video) if args.video else decode_image_file(args.image, image)
    row = {"problem_id": Path(args.video or args.image).name, "problem": args.question,
           "problem_type": args.problem_type, "options": list(args.options), "data_type": media.kind,
           "solution": f"<answer>{args.solution}</answer>" if args.solution else "", "path": media.path}
    sample = processor.encode(build_messages(row, eval=not args.train_prompt), media, row=row, target=args.answer)
    return processor.collate([sample])


def explain(args: argparse.Namespace) -> Path:
    """One video/image + question -> report.html, report.json, answer.png in `args.out`."""
    from ktr.config import SamplingConfig
    from ktr.report import explain_batch, report_data, thumbnails, write_report
    from ktr.report.attribution import apply_noise_floor
    from ktr.report.html import few_tokens_note, render_figure

    config = read_configs(args.config) if args.config else {}
    policy_cfg, video, image = settings_from_config(config)
    model_args = (config.get("model") or {}).get("init_args") or {}
    key_cfg = typed_section(KeyTokenConfig, model_args.get("key_tokens"), "model.init_args.key_tokens")
    chunk = ((model_args.get("loss") or {}).get("chunk_size", DEFAULT_CHUNK_SIZE))
    torch.manual_seed(args.seed)
    policy = load_explain_policy(policy_cfg, args.ckpt)
    policy.model.eval()
    prompts = _prompt(args, policy.processor, video, image)
    sampling = SamplingConfig(group_size=args.samples, temperature=args.temperature, top_p=args.top_p,
                              max_new_tokens=args.max_new_tokens)
    record = explain_batch(policy.model, policy.processor, prompts, key_cfg, sampling,
                           given=args.answer is not None, chunk_size=chunk,
                           greedy=args.temperature == 0)
    cfg = replace(key_cfg, enabled=True)
    record = apply_noise_floor(record, cfg, args.floor_mads, args.min_score)
    where = args.ckpt or policy_cfg.name_or_path
    data = report_data(record, policy.tokenizer, cfg, kind="explain",
                       title=f"Key tokens: {Path(args.video or args.image).name} ({Path(str(where)).name})")
    data["step"] = None  # not a training step: the page names the checkpoint instead
    data["checkpoint"] = str(where)
    few = few_tokens_note(data["noise_floor"])
    if few:
        print(f"note: {few}")
    out = Path(args.out)
    page = write_report(data, [thumbnails(prompts.media[0])], out, "report")
    print(f"report: {page}\ndata: {out / 'report.json'}")
    if not args.no_png:
        _png(render_figure(data), out)
    return page


def _png(figure_html: str, out: Path) -> Path | None:
    from ktr.report.chromium import ChromiumMissing, render, trim_png

    fig = out / "answer.html"
    fig.write_text(figure_html, encoding="utf-8")
    png = out / "answer.png"
    try:
        result = render(fig, png, width=900, height=1600)
    except ChromiumMissing as err:
        print(f"answer.png not written: {err}. Open {fig} in a browser and take the screenshot there.")
        return None
    if result.png is None:
        print(f"answer.png not written: Chromium exited with {result.returncode}:\n{result.stderr[-2000:]}")
        return None
    trim_png(png)
    print(f"picture: {png}")
    return png


def main(argv: Sequence[str] | None = None) -> Path:
    """Entry point of `ktr explain` (dispatched by the `ktr` console script)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.stats:
        from ktr.report.stats import write_statistics

        stats = write_statistics(args.stats, args.out)
        out = Path(args.out or args.stats)
        print(json.dumps({"reports": stats["reports"], "valid_tokens": stats["valid_tokens"],
                          "fraction": stats["fraction"], "regions": stats["regions"]}, indent=1))
        print(f"statistics: {out / 'stats.html'}")
        return out / "stats.html"
    missing = [f"--{n}" for n, v in (("out", args.out), ("question", args.question)) if not v]
    if not (args.video or args.image):
        missing.append("--video or --image")
    if missing:
        parser.error("missing " + ", ".join(missing))
    if args.samples < 1:
        parser.error("--samples must be >= 1")
    if not (args.floor_mads >= 0 and args.min_score >= 0):  # also refuses NaN
        parser.error(f"--floor-mads and --min-score must be >= 0, got {args.floor_mads} and {args.min_score}")
    if args.samples > 1 and (args.temperature == 0 or args.answer is not None):
        parser.error("--samples > 1 needs sampling: set --temperature > 0 (and no --answer)")
    return explain(args)


if __name__ == "__main__":
    main()

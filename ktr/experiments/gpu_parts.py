"""The comparison parts of the GPU check (vision processor, bf16 parity, shared prefix) and its report helpers
(layer L4, with `ktr.experiments.gpu_check`; `scripts/gpu_check.py` is the command line).

Each part fills `out` as it goes (so that a failure keeps what was measured) and returns its headline figures;
`{"status": "skipped", "reason": ...}` when something it needs is absent. See `scripts/gpu_check.py` for the run.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import torch

from ktr.data.video import VideoSettings

TRAIN_VIDEO = VideoSettings()  # the released training settings: 16 frames at 128*28*28 pixels
EVAL_VIDEO = VideoSettings(min_pixels=128 * 28 * 28, max_pixels=256 * 28 * 28)  # configs/eval.yaml


def _processor(config):
    from ktr.data.processor import VisionLanguageProcessor
    from ktr.model.tokenizer import build_qwen2_tokenizer

    return VisionLanguageProcessor(build_qwen2_tokenizer(), image_token_id=config.image_token_id,
                                   video_token_id=config.video_token_id)


# ---------------------------------------------------------------------------------------- vision processor


def _synthetic_source(n: int = 24, height: int = 360, width: int = 640) -> torch.Tensor:
    """A smooth moving pattern `[n, 3, H, W]` uint8 (stands in for the video when none is given)."""
    y = torch.linspace(0, 1, height).view(1, 1, height, 1)
    x = torch.linspace(0, 1, width).view(1, 1, 1, width)
    t = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1) / n
    c = torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    return (127.5 + 127.5 * torch.sin(6.28 * (c * x + 2 * y + t))).round().to(torch.uint8)


def _clips(video: Path | None, settings: VideoSettings, raw_too: bool):
    """ktr's resized clip, the sampled frames at source size `[F, 3, H, W]` uint8 (if `raw_too`), the source."""
    from ktr.data.video import frames_from_array, load_video

    if video is None:
        source = _synthetic_source()
        clip = frames_from_array(source, 8.0, settings)
        return clip, source[clip.indices], "synthetic 24 frames 360x640 at 8 fps (no --video)"
    clip = load_video(str(video), settings)
    if not raw_too:
        return clip, None, str(video)
    import decord

    raw = decord.VideoReader(str(video), num_threads=1).get_batch(clip.indices).asnumpy()  # [F, H, W, 3]
    return clip, torch.from_numpy(raw).permute(0, 3, 1, 2).contiguous(), str(video)


def _hf_video(raw: torch.Tensor, settings: VideoSettings) -> dict:
    """transformers' Qwen2-VL video processor on `raw` with ktr's per-frame pixel bounds (it resizes itself)."""
    from transformers import Qwen2VLVideoProcessor

    kw = dict(size={"shortest_edge": settings.min_pixels, "longest_edge": settings.frame_max_pixels(raw.shape[0])},
              do_sample_frames=False, return_tensors="pt")
    if "cap_pixels_per_frame" in getattr(Qwen2VLVideoProcessor.valid_kwargs, "__annotations__", {}):
        kw["cap_pixels_per_frame"] = False  # transformers < 5.22: the cap is already in longest_edge above
    return dict(Qwen2VLVideoProcessor()(videos=[raw], **kw))


def _qwen_vl_utils_resize(raw: torch.Tensor, clip) -> dict:
    """ktr's resized frames vs the call qwen-vl-utils makes (torchvision v1 `resize`, uint8, BICUBIC, antialias)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import resize

    theirs = resize(raw, list(clip.frames.shape[-2:]), interpolation=InterpolationMode.BICUBIC, antialias=True)
    d = (theirs.int() - clip.frames.int()).abs()  # [F, 3, H, W] in uint8 levels
    return {"max_abs_diff_levels": d.max().item(), "frac_differ": (d > 0).float().mean().item()}


def _compare_pixels(mine: torch.Tensor, theirs: torch.Tensor, std) -> dict:
    """`[P, D]` patch rows of both: max abs difference, normalised and in uint8 levels."""
    if mine.shape != theirs.shape:
        return {"same_shape": False, "ktr_shape": list(mine.shape), "hf_shape": list(theirs.shape)}
    diff = (mine.float() - theirs.float()).abs()  # [P, D], D = (C, tp, py, px)
    levels = diff.view(diff.shape[0], 3, -1) * torch.tensor(std).view(1, 3, 1) * 255
    return {"same_shape": True, "max_abs_pixel_diff": diff.max().item(), "max_abs_diff_levels": levels.max().item(),
            "frac_differ_over_half_level": (levels > 0.5).float().mean().item()}


def vision_processor(video: Path | None, out: dict) -> dict:
    """ktr's grids and token counts at both settings; transformers' side when torchvision and the video exist."""
    from ktr.config import TinyModelConfig
    from ktr.model.policy import tiny_config
    from ktr.types import Media

    reason = None
    if importlib.util.find_spec("torchvision") is None:
        reason = "torchvision is not installed (transformers' video processor needs it)"
    elif video is None:
        reason = "no --video given (copy the fixture into the repo, see the docstring)"
    elif not Path(video).is_file():
        reason = f"--video {video} does not exist"
    use = video if video is not None and Path(video).is_file() else None  # ktr's side runs without torchvision
    processor = _processor(tiny_config(TinyModelConfig()))  # only the token ids matter here
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    merge = processor.patch.merge_size
    for name, settings in (("train", TRAIN_VIDEO), ("eval", EVAL_VIDEO)):
        clip, raw, source = _clips(use, settings, raw_too=reason is None)
        sample = processor.encode(messages, Media("video", clip.frames, clip.sample_fps))
        rec = out.setdefault(name, {})
        rec["ktr"] = {"source": source, "frames": int(clip.frames.shape[0]), "size": list(clip.frames.shape[-2:]),
                      "grid": sample.grid_thw.tolist(),
                      "tokens": int((sample.prompt_ids == processor.video_token_id).sum())}
        if reason is not None:
            continue
        hf = _hf_video(raw, settings)
        grid = hf["video_grid_thw"][0]
        rec["transformers"] = {"grid": grid.tolist(), "tokens": int(grid.prod()) // merge**2}
        rec["grids_agree"] = rec["ktr"]["grid"] == rec["transformers"]["grid"]
        rec["tokens_agree"] = rec["ktr"]["tokens"] == rec["transformers"]["tokens"]
        rec.update(_compare_pixels(sample.pixel_values, hf["pixel_values_videos"], processor.patch.image_std))
        rec["frames_vs_qwen_vl_utils_resize"] = _qwen_vl_utils_resize(raw, clip)
    if reason is not None:
        return {"status": "skipped", "reason": reason}
    keys = ("grids_agree", "tokens_agree", "max_abs_pixel_diff", "max_abs_diff_levels", "frac_differ_over_half_level")
    return {k: {**{f: out[k].get(f) for f in keys},
                "vs_qwen_vl_utils_levels": out[k]["frames_vs_qwen_vl_utils_resize"]["max_abs_diff_levels"]}
            for k in ("train", "eval")}


# ---------------------------------------------------------------------------------------------- bf16 parity


def _prompts(processor, settings: VideoSettings, n: int):
    from ktr.data.prompts import build_messages
    from ktr.data.synthetic import SyntheticSpec, make_item
    from ktr.data.video import frames_from_array
    from ktr.types import Media

    side = int(settings.max_pixels ** 0.5)
    spec = SyntheticSpec(num_frames=2 * settings.max_frames, size=side - side % 28, fps=4.0)
    samples = []
    for i in range(n):
        row, frames = make_item(0, i, spec)
        clip = frames_from_array(frames, spec.fps, settings)
        samples.append(processor.encode(build_messages(row), Media("video", clip.frames, clip.sample_fps), row=row))
    return processor.collate(samples)


@torch.no_grad()
def _ktr_logps(model, batch, rollout, chunk_size: int) -> torch.Tensor:
    from ktr.model.forward import SequenceView, completion_hidden, completion_logps, encode_media

    view = SequenceView.of(model, rollout, batch)
    hidden = completion_hidden(model, view, encode_media(model, batch.pixel_values, batch.grid_thw),
                               rollout.completion_ids.shape[1])
    logps, _ = completion_logps(model, hidden, rollout.completion_ids, rollout.completion_mask, chunk_size)
    return logps.float()  # [N, T]


@torch.no_grad()
def _hf_logps(model, batch, rollout) -> torch.Tensor:
    """transformers' own forward on the N rows (each row re-encodes its video), log-probs `[N, T]`."""
    rows = rollout.prompt_index.tolist()
    chunks = torch.split(batch.pixel_values, batch.grid_thw.prod(-1).tolist())
    t = rollout.completion_ids.shape[1]
    out = model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                pixel_values_videos=torch.cat([chunks[p] for p in rows]), video_grid_thw=batch.grid_thw[rows],
                second_per_grid_ts=batch.second_per_grid_ts[rows], mm_token_type_ids=rollout.mm_token_type_ids,
                use_cache=False, logits_to_keep=t + 1)  # logits of the last T + 1 positions only
    logps = out.logits[:, :-1].float().log_softmax(-1)  # [N, T, V]
    return logps.gather(-1, rollout.completion_ids.unsqueeze(-1)).squeeze(-1)


def _diff(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor) -> dict:
    d = (a - b).abs()[valid]
    return {"max_abs": d.max().item(), "mean_abs": d.mean().item()}


def parity(device: torch.device, tiny: bool, new_tokens: int, out: dict) -> dict:
    """bf16 log-probs of ktr's path vs transformers' forward, per attention kernel, and vs a float32 forward."""
    from transformers.utils import is_flash_attn_2_available

    from ktr.config import SamplingConfig, TinyModelConfig
    from ktr.experiments.bench_step import arch_config, build_random
    from ktr.model.forward import set_head_logits
    from ktr.model.policy import tiny_config
    from ktr.rollout.hf import generate

    config = tiny_config(TinyModelConfig()) if tiny else arch_config("qwen2.5-vl-7b", 2, 2)
    fa2 = device.type == "cuda" and is_flash_attn_2_available()
    out["model"] = "tiny" if tiny else "qwen2.5-vl-7b widths, 2 decoder layers, 2 vision blocks, random weights"
    out["flash_attention_2_status"] = "compared" if fa2 else "skipped: " + (
        "flash_attn is not importable" if device.type == "cuda" else "needs CUDA")
    processor = _processor(config)
    batch = _prompts(processor, VideoSettings(max_frames=4, min_pixels=56 * 56, max_pixels=56 * 56) if tiny
                     else TRAIN_VIDEO, n=2).to(device)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = build_random(config, device, torch.bfloat16).eval()
    rollout = generate(model, processor, batch, SamplingConfig(group_size=2, max_new_tokens=new_tokens, top_p=1.0))
    valid = rollout.completion_mask
    out["tokens_compared"], out["sequence_length"] = int(valid.sum()), int(rollout.input_ids.shape[1])
    fp32 = copy.deepcopy(model).float()
    hf32 = _hf_logps(fp32, batch, rollout)
    out["float32"] = {"ktr_vs_hf": _diff(_ktr_logps(fp32, batch, rollout, 1024), hf32, valid)}
    del fp32
    state = model.state_dict()
    for impl in ["sdpa"] + (["flash_attention_2"] if fa2 else []):
        if impl != "sdpa":
            cfg = copy.deepcopy(config)
            cfg._attn_implementation = impl
            del model
            model = build_random(cfg, device, torch.bfloat16).eval()
            model.load_state_dict(state)
        set_head_logits(model, "compute")  # bf16-rounded logits, as transformers' lm_head: comparable to `theirs`
        mine, theirs = _ktr_logps(model, batch, rollout, 1024), _hf_logps(model, batch, rollout)
        set_head_logits(model, "float32")  # ktr's default (`policy.head_logits`): the bf16 product kept in float32
        mine32 = _ktr_logps(model, batch, rollout, 1024)
        out[impl] = {"ktr_vs_hf": _diff(mine, theirs, valid), "ktr_vs_hf_float32": _diff(mine, hf32, valid),
                     "hf_vs_hf_float32": _diff(theirs, hf32, valid),
                     "ktr_float32_logits_vs_hf_float32": _diff(mine32, hf32, valid)}
    out["float32_output_gemm"] = float32_output_gemm_state()
    impls = [impl for impl in ("sdpa", "flash_attention_2") if impl in out]
    return {**{impl: out[impl]["ktr_vs_hf"]["max_abs"] for impl in impls},
            "float32_logits_vs_float32_forward": {i: out[i]["ktr_float32_logits_vs_hf_float32"]["mean_abs"]
                                                  for i in impls},
            "bf16_logits_vs_float32_forward": {i: out[i]["ktr_vs_hf_float32"]["mean_abs"] for i in impls}}


def float32_output_gemm_state() -> str:
    """Which way `ktr.ops.mm_float32` took in this process: cuBLAS's float32-output GEMM, the upcast fallback
    after that failed, or neither (not called on CUDA)."""
    from ktr import ops

    return {(): "not called on CUDA", (True,): "cuBLAS float32-output GEMM",
            (False,): "upcast fallback (float32-output GEMM failed)"}[tuple(ops.CUDA_FLOAT32_OUT)]


def _timed(device: torch.device, fn):
    """`fn()`, its seconds and (CUDA) peak allocated GiB above what was allocated before it."""
    import time

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    ret = fn()
    if cuda:
        torch.cuda.synchronize(device)
    secs = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30 if cuda else None
    return ret, round(secs, 4), None if peak is None else round(peak, 3)


def _attention_inputs(device, dtype, prompt: int, group: int, new_tokens: int, heads: int, kv_heads: int,
                      head_dim: int) -> dict:
    """Per-token leaves of one attention layer: the prompt's q/k/v once, each completion's, and output weights."""
    gen = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    p, g, t, h, hk, d = prompt, group, new_tokens, heads, kv_heads, head_dim
    return dict(qp=r(1, h, p, d), kp=r(1, hk, p, d), vp=r(1, hk, p, d), qc=r(g, h, t, d), kc=r(g, hk, t, d),
                vc=r(g, hk, t, d), wp=r(p, h, d), wc=r(g, t, h, d))


def _attention_run(impl: str, x: dict, layout, module, scale: float):
    """One forward + backward of `impl` on fresh leaves of `x`: outputs `[P + G*T, H, D]` in packed order (prompt,
    then completion-major), and the leaves' gradients."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from ktr.model.attention import split_sdpa, split_varlen

    leaves = {k: x[k].detach().clone().requires_grad_() for k in ("qp", "kp", "vp", "qc", "kc", "vc")}
    qp, kp, vp, qc, kc, vc = leaves.values()
    g, h, t, d = qc.shape
    p = qp.shape[2]
    if impl.startswith("naive"):
        q, k, v = (torch.cat([a.expand(g, -1, -1, -1), b], 2) for a, b in ((qp, qc), (kp, kc), (vp, vc)))
        if impl == "naive_fa2":
            from flash_attn import flash_attn_func

            out = flash_attn_func(*(z.transpose(1, 2) for z in (q, k, v)), softmax_scale=scale, causal=True)
        else:
            mask = None
            if impl == "naive_mask":  # what transformers passes once a row of the batch is padded
                mask = torch.ones(p + t, p + t, dtype=torch.bool, device=q.device).tril().expand(g, 1, -1, -1)
            out = sdpa_attention_forward(module, q, k, v, mask, scaling=scale)[0]  # [G, P+T, H, D]
        packed = torch.cat([out[0, :p], out[:, p:].flatten(0, 1)])
    else:
        def flat(a, b):  # prompt once, then the completions one after another: [1, H, P + G*T, D]
            return torch.cat([a, b.transpose(0, 1).flatten(1, 2).unsqueeze(0)], 2)

        q, k, v = flat(qp, qc), flat(kp, kc), flat(vp, vc)
        if impl == "dense":
            mask = layout.dense_mask(q.device)[None, None]
            out = sdpa_attention_forward(module, q, k, v, mask, scaling=scale)[0]
        elif impl == "split":
            out = split_sdpa(module, q, k, v, layout, scaling=scale)[0]
        else:  # split_fa2
            out = split_varlen(module, q, k, v, layout, scaling=scale)[0]
        packed = out[0]
    loss = (packed[:p].float() * x["wp"].float()).sum() + (packed[p:].float() * x["wc"].flatten(0, 1).float()).sum()
    loss.backward()
    return packed.detach(), {k: v.grad for k, v in leaves.items()}


def attention_layouts(device: torch.device, dtype: torch.dtype, new_tokens: int, prompt: int = 1200, group: int = 8,
                      heads: int = 28, kv_heads: int = 4, head_dim: int = 128, repeats: int = 3,
                      impls: tuple[str, ...] | None = None) -> dict:
    """One decoder layer's attention, forward + backward, at these head shapes (the defaults: Qwen2.5-VL-7B's 28
    query and 4 key/value heads of 128, a 1,200-token prompt, G = 8) in each layout: `naive` (G rows of prompt +
    completion, transformers' SDPA call without a mask, `is_causal`), `naive_mask` (the same with the explicit
    causal mask transformers passes once any row is padded), `dense` (one packed row, `[W, W]` mask), `split`
    (`ktr.model.attention.split_sdpa`) and, on CUDA with flash-attention 2, `naive_fa2` and `split_fa2`
    (`split_varlen`). Repeats interleaved (order alternating); median seconds (CPU: process time, run it on one
    thread), ratio to `naive`, and the largest difference to `naive` of the outputs and of the six leaves'
    gradients, relative to the largest naive value. Used by `scripts/bench_prefix.py --parts attention` (CPU) and
    the GPU check's `prefix` part."""
    import statistics
    import time

    from ktr.model.attention import flash_available
    from ktr.model.prefix import SplitGroup, SplitLayout

    cuda = device.type == "cuda"
    if impls is None:
        impls = ("naive", "naive_mask", "dense", "split")
        if cuda and flash_available() and dtype in (torch.float16, torch.bfloat16):
            impls += ("naive_fa2", "split_fa2")
    x = _attention_inputs(device, dtype, prompt, group, new_tokens, heads, kv_heads, head_dim)
    layout = SplitLayout((SplitGroup(0, prompt, group, new_tokens),))
    module = torch.nn.Module()
    module.num_key_value_groups = heads // kv_heads
    scale = head_dim ** -0.5
    clock = time.perf_counter if cuda else time.process_time
    seconds: dict[str, list[float]] = {i: [] for i in impls}
    results = {}
    for r in range(repeats + 1):  # the first round is warm-up
        for impl in impls if r % 2 == 0 else impls[::-1]:
            if cuda:
                torch.cuda.synchronize(device)
            start = clock()
            results[impl] = _attention_run(impl, x, layout, module, scale)
            if cuda:
                torch.cuda.synchronize(device)
            if r:
                seconds[impl].append(clock() - start)
    out0, grads0 = results["naive"]
    rec = {"prompt": prompt, "group": group, "new_tokens": new_tokens, "heads": heads, "kv_heads": kv_heads,
           "head_dim": head_dim, "dtype": str(dtype).removeprefix("torch."), "device": device.type,
           "repeats": repeats, "clock": "wall" if cuda else "process cpu", "pairs": {
               "naive": group * (prompt + new_tokens) * (prompt + new_tokens + 1) // 2,
               "dense": (prompt + group * new_tokens) ** 2, "split": layout.pairs()}, "impls": {}}
    for impl in impls:
        out, grads = results[impl]
        med = statistics.median(seconds[impl])
        rec["impls"][impl] = {
            "seconds": round(med, 4), "seconds_all": [round(s, 4) for s in seconds[impl]],
            "x_naive": round(med / statistics.median(seconds["naive"]), 3),
            "max_rel_out_diff": float((out.float() - out0.float()).abs().max() / out0.float().abs().max()),
            "max_rel_grad_diff": max(float((grads[k].float() - grads0[k].float()).abs().max()
                                           / grads0[k].float().abs().max()) for k in grads0)}
    return rec


def random_rollout(batch, group: int, new_tokens: int, vocab: int, seed: int = 0):
    """`group` random completions of exactly `new_tokens` ids below `vocab` after `batch`'s one prompt, as the
    scoring passes take a rollout (a random model's completions cost the same to score as a trained one's)."""
    from ktr.types import Rollout

    comp = torch.randint(0, vocab, (group, new_tokens), generator=torch.Generator().manual_seed(seed))
    comp = comp.to(batch.input_ids.device)
    valid = torch.ones_like(comp, dtype=torch.bool)
    return Rollout(group, torch.cat([batch.input_ids.repeat(group, 1), comp], 1),
                   torch.cat([batch.attention_mask.repeat(group, 1), valid.long()], 1),
                   torch.cat([batch.mm_token_type_ids.repeat(group, 1), torch.zeros_like(comp, dtype=torch.int)], 1),
                   comp, valid)


def layout_view(model, rollout, batch, layout: str):
    """The scoring passes' view of `rollout` in one layout: `naive` (G rows of prompt + completion), `released`
    (naive rows, the visual probe's media masked rather than dropped, as the released code does), `dense` (one
    packed row per group, dense mask) or `split` (packed, split attention: the default)."""
    from dataclasses import replace

    from ktr.model.forward import SequenceView

    naive = layout in ("naive", "released")
    view = SequenceView.of(model, rollout, batch, shared_prefix=not naive,
                           prefix_attention="dense" if layout == "dense" else "split")
    return replace(view, drop_hidden=False) if layout == "released" else view


SCORING_PHASES = ("policy_forward", "backward", "reference", "visual", "temporal")


def scoring_passes(device: torch.device, model, processor, batch, group: int, new_tokens: int, vocab: int,
                   layouts=("naive", "released", "split"), repeats: int = 3) -> dict:
    """Issue 26's "four scoring passes" on `group` random completions of `new_tokens` tokens, per layout: the policy
    pass's forward (with gradient) and its backward, the reference pass and the visual and temporal probes, median
    seconds of `repeats` after a warm-up round. `released` times its visual pass only: its other passes are the
    naive rows exactly. Totals: the four passes, and with the backward, against naive's."""
    from statistics import median

    from ktr.model.forward import completion_hidden, completion_logps, encode_media
    from ktr.probes.temporal import temporal_scores
    from ktr.probes.visual import visual_scores

    rollout = random_rollout(batch, group, new_tokens, vocab)
    ids, valid, t = rollout.completion_ids, rollout.completion_mask, new_tokens
    seconds = {}
    for layout in layouts:
        view = layout_view(model, rollout, batch, layout)
        runs = {k: [] for k in SCORING_PHASES}

        def forward():
            feats = encode_media(model, batch.pixel_values, batch.grid_thw)
            return completion_logps(model, completion_hidden(model, view, feats, t), ids, valid,  # noqa: B023
                                    with_entropy=True)[0], feats

        for r in range(repeats + 1):
            timed = {}
            if layout == "released":
                with torch.no_grad():
                    lp, feats = forward()
            else:
                (lp, feats), timed["policy_forward"], _ = _timed(device, forward)
                _, timed["backward"], _ = _timed(device, lambda: lp.sum().backward())  # noqa: B023
                model.zero_grad(set_to_none=True)
            feats, lp = feats.detached(leaves=False), lp.detach().float()
            with torch.no_grad():
                _, timed["visual"], _ = _timed(device, lambda: visual_scores(
                    model, batch, view, feats, ids, valid, lp))  # noqa: B023
                if layout != "released":
                    _, timed["reference"], _ = _timed(device, lambda: completion_logps(
                        model, completion_hidden(model, view, feats, t), ids, valid))  # noqa: B023
                    _, timed["temporal"], _ = _timed(device, lambda: temporal_scores(
                        model, processor, batch, view, feats, ids, valid, lp,  # noqa: B023
                        generator=torch.Generator().manual_seed(2)))
            for k, v in timed.items():
                if r:  # the first round warms up
                    runs[k].append(v)
        seconds[layout] = {k: round(median(v), 4) for k, v in runs.items() if v}
    out = {"group_size": group, "new_tokens": new_tokens, "prompt_tokens": int(batch.attention_mask.sum()),
           "repeats": repeats, "seconds": seconds, "totals": {}}
    full = {k: {**seconds.get("naive", {}), **v} if k == "released" else v for k, v in seconds.items()}
    for name, phases in (("passes", ("policy_forward", "reference", "visual", "temporal")),
                         ("passes_backward", SCORING_PHASES)):
        totals = {k: round(sum(v[p] for p in phases), 4) for k, v in full.items() if all(p in v for p in phases)}
        out["totals"][name] = {k: {"seconds": v, "x_naive": round(v / totals["naive"], 3) if "naive" in totals
                                   else None} for k, v in totals.items()}
    return out


def _bench_rollout_model(device: torch.device, tiny: bool):
    """The rollout parts' model and prompt: a random bf16 Qwen2.5-VL at 7B widths (4 decoder layers, 2 vision
    blocks; `tiny`: the built-in tiny shape), SDPA, one video prompt. Returns `(model, processor, batch, group
    size, description)`."""
    from ktr.config import TinyModelConfig
    from ktr.experiments.bench_step import arch_config, build_random
    from ktr.model.policy import tiny_config

    config = tiny_config(TinyModelConfig()) if tiny else arch_config("qwen2.5-vl-7b", 4, 2)
    config._attn_implementation = "sdpa"
    processor = _processor(config)
    batch = _prompts(processor, VideoSettings(max_frames=4, min_pixels=56 * 56, max_pixels=56 * 56) if tiny
                     else TRAIN_VIDEO, n=1).to(device)
    torch.manual_seed(0)
    model = build_random(config, device, torch.bfloat16)
    what = "tiny" if tiny else "qwen2.5-vl-7b widths, 4 decoder layers, 2 vision blocks, random, bf16"
    return model, processor, batch, (4 if tiny else 8), what


def prefix(device: torch.device, tiny: bool, new_tokens: int, out: dict) -> dict:
    """Shared prompt prefix vs naive (issues 11, 26) at 7B widths (4 decoder layers, 2 vision blocks, bf16): rollout
    (`hf` vs `shared`, G = 8, released sampling) and each scoring pass on its completions (`loss.shared_prefix`
    false vs true, i.e. split attention): seconds, peak allocated memory, and the log-prob difference between the
    two layouts; the four scoring passes at 768 new tokens, naive / released / split (`scoring_passes`; the head cut
    to the 7B's share of a token's work); then one attention layer forward + backward at 7B head shapes, 128 and
    768 new tokens, naive / dense mask / split (SDPA; and flash-attention 2 naive / split when importable):
    `attention_layouts`."""
    from ktr.config import SamplingConfig
    from ktr.model.forward import SequenceView, completion_hidden, completion_logps, encode_media
    from ktr.probes.temporal import temporal_scores
    from ktr.probes.visual import visual_scores
    from ktr.rollout.hf import generate
    from ktr.rollout.shared import generate_shared

    model, processor, batch, g, what = _bench_rollout_model(device, tiny)
    out.update(model=what, group_size=g, new_tokens=new_tokens, prompt_tokens=int(batch.attention_mask.sum()))
    cfg = SamplingConfig(group_size=g, max_new_tokens=new_tokens, temperature=1.0, top_p=0.95)
    model.generation_config.min_new_tokens = new_tokens  # every completion full length (hf); shared: see below
    rollouts = {}
    for impl, fn in (("naive", generate), ("shared", generate_shared)):
        torch.manual_seed(1)
        rollouts[impl], secs, peak = _timed(device, lambda: fn(model, processor, batch, cfg))  # noqa: B023
        out.setdefault("rollout", {})[impl] = {"seconds": secs, "peak_gib": peak,
                                               "new_tokens": int(rollouts[impl].completion_ids.shape[1])}
    rollout = rollouts["shared"]
    ids, valid, t = rollout.completion_ids, rollout.completion_mask, rollout.completion_ids.shape[1]
    model.train()
    logps = {}
    for impl in ("naive", "shared"):
        view = SequenceView.of(model, rollout, batch, shared_prefix=impl == "shared")
        rec = out.setdefault("passes", {}).setdefault(impl, {})

        def policy():
            feats = encode_media(model, batch.pixel_values, batch.grid_thw)
            hidden = completion_hidden(model, view, feats, t)  # noqa: B023
            lp = completion_logps(model, hidden, ids, valid, 1024)[0]
            (lp.sum()).backward()
            return lp.detach().float(), feats

        (logps[impl], feats), rec["policy_backward_s"], rec["policy_backward_peak_gib"] = _timed(device, policy)
        model.zero_grad(set_to_none=True)
        feats = feats.detached(leaves=False)
        with torch.no_grad():
            _, rec["reference_s"], rec["reference_peak_gib"] = _timed(device, lambda: completion_logps(
                model, completion_hidden(model, view, feats, t), ids, valid, 1024))  # noqa: B023
            _, rec["visual_s"], rec["visual_peak_gib"] = _timed(device, lambda: visual_scores(
                model, batch, view, feats, ids, valid, logps[impl]))  # noqa: B023
            _, rec["temporal_s"], rec["temporal_peak_gib"] = _timed(device, lambda: temporal_scores(
                model, processor, batch, view, feats, ids, valid, logps[impl],  # noqa: B023
                generator=torch.Generator().manual_seed(2)))
    out["logp_shared_vs_naive"] = _diff(logps["shared"], logps["naive"], valid)
    n, sh = out["passes"]["naive"], out["passes"]["shared"]
    keys = [k for k in n if k.endswith("_s")]
    # issue 26's target: the four scoring passes at the released 768 new tokens (random completions), naive / released
    # (media masked) / split, with the head cut to the 7B's share of a token's work (layers / 28 of its rows)
    from ktr.experiments.bench_step import ARCHS, narrow_head
    from ktr.model.forward import output_projection
    from ktr.model.tokenizer import FIRST_SPECIAL_ID

    full = output_projection(model).out_features
    layers = model.config.get_text_config().num_hidden_layers
    restore = narrow_head(model, full if tiny else full * layers // ARCHS["qwen2.5-vl-7b"]["text"]["num_hidden_layers"])
    try:
        # no special token (vision placeholders included) among the random completions
        ids_below = min(output_projection(model).out_features, FIRST_SPECIAL_ID)
        out["four_passes"] = scoring_passes(device, model, processor, batch, g, new_tokens if tiny else 768,
                                            ids_below, repeats=1 if tiny else 3)
    finally:
        restore()
    # one attention layer at 7B head shapes (28 x 128, 4 kv heads, prompt 1,200, G = 8), bf16: naive / dense / split,
    # and flash-attention 2's naive and split calls when importable (`attention_layouts`)
    shapes = dict(prompt=40, group=4, heads=4, kv_heads=2, head_dim=16) if tiny else {}
    lengths = (new_tokens,) if tiny else (128, 768)
    out["attention"] = {}
    for length in lengths:
        out["attention"][str(length)] = attention_layouts(device, torch.bfloat16, length, repeats=1 if tiny else 3,
                                                          **shapes)
    split = {t: {k: v["x_naive"] for k, v in rec["impls"].items() if k.startswith("split")}
             for t, rec in out["attention"].items()}
    return {"rollout_speedup": round(out["rollout"]["naive"]["seconds"] / out["rollout"]["shared"]["seconds"], 2),
            "passes_time_ratio": round(sum(sh[k] for k in keys) / sum(n[k] for k in keys), 3),
            "max_abs_dlogp": out["logp_shared_vs_naive"]["max_abs"], "attention_split_x_naive": split,
            "four_passes_x_naive": {"new_tokens": out["four_passes"]["new_tokens"],
                                    **{k: {i: v["x_naive"] for i, v in t.items()}
                                       for k, t in out["four_passes"]["totals"].items()}},
            "attention_max_rel_grad_diff": max(v["max_rel_grad_diff"] for rec in out["attention"].values()
                                               for k, v in rec["impls"].items() if k.startswith("split"))}



# ---------------------------------------------------------------------------------------------- report


def loss_summary(records: list[dict]) -> dict:
    """Per N*T: naive peak/time and the best chunked case by peak memory, with the gradient error."""
    out = {}
    for n in sorted({r["tokens"] for r in records}):
        rs = [r for r in records if r["tokens"] == n]
        naive = next((r for r in rs if r["impl"] == "naive"), None)
        chunked = [r for r in rs if r["impl"] != "naive"]
        best = min(chunked, key=lambda r: (r["peak_mem_mb"] or 0, r["time_s"]), default=None)
        out[str(n)] = {"naive_mb": naive and naive["peak_mem_mb"], "naive_s": naive and naive["time_s"],
                       "best_chunked": best and {k: best[k] for k in ("strategy", "chunk", "peak_mem_mb", "time_s")},
                       "max_rel_grad_err": max((r["max_rel_grad_err"] for r in chunked), default=None)}
    return out


def ktr_vs_grpo(summary: dict) -> dict | None:
    """Video-KTR against GRPO, estimated from one KTR step's phases: GRPO is the same step without its probes
    phase (`key_tokens.enabled: false` skips the two probe passes and nothing else of weight), so its time is the
    step's less the probes' and its peak the largest peak of the other phases. Issue 26's goals: <= 1.10 in time,
    <= 1.05 in peak memory. None when the step has no probes phase."""
    step, probes = summary["step"], summary.get("probes") or {}
    if not probes.get("seconds") or step["seconds"] <= probes["seconds"]:
        return None
    out = {"time_x": round(step["seconds"] / (step["seconds"] - probes["seconds"]), 3), "memory_x": None}
    others = [v["peak_gb"] for k, v in summary.items() if k not in ("step", "probes") and v["peak_gb"]]
    if others and step["peak_gb"]:
        out["memory_x"] = round(step["peak_gb"] / max(others), 3)
    return out


def goal(summary: dict, goal_gib: float, cuda: bool) -> dict:
    """The step's peak against the QLoRA goal (only meaningful on CUDA: on CPU it is the process RSS)."""
    step = summary["step"]
    worst = max(v for v in (step["peak_gb"], step["reserved_gb"]) if v is not None)
    return {"goal_gib": goal_gib, "peak_allocated_gib": step["peak_gb"], "peak_reserved_gib": step["reserved_gb"],
            "fits": (worst <= goal_gib) if cuda else None}


def _headline(name: str, rec: dict) -> str:
    if rec["status"] not in ("ok",):
        return rec.get("reason") or rec.get("error", "")[:160]
    if name == "vision_processor":
        return "; ".join(f"{k}: grids {v['grids_agree']}, tokens {v['tokens_agree']}, max |d| vs HF "
                         f"{v['max_abs_diff_levels']:.2g} levels ({100 * v['frac_differ_over_half_level']:.1f}% of "
                         f"values), vs qwen-vl-utils resize {v['vs_qwen_vl_utils_levels']}"
                         for k, v in rec.items() if k in ("train", "eval"))
    if name == "prefix":
        attn = "; ".join(f"{t} new tokens " + ", ".join(f"{k} {v}x" for k, v in r.items())
                         for t, r in rec.get("attention_split_x_naive", {}).items())
        four, fx = "", rec.get("four_passes_x_naive")
        if fx:
            def ratios(x):
                return ", ".join(f"{k} {v}x" for k, v in x.items() if k != "naive")
            four = (f"; four scoring passes at {fx['new_tokens']} new tokens vs naive: {ratios(fx['passes'])} (with "
                    f"the backward: {ratios(fx['passes_backward'])})")
        return (f"rollout shared {rec['rollout_speedup']}x faster; scoring passes {rec['passes_time_ratio']}x naive "
                f"time; max |d logp| shared vs naive {rec['max_abs_dlogp']:.3g}" + four
                + (f"; attention layer (fwd+bwd) vs naive: {attn}" if attn else ""))
    if name == "decode":
        return "tokens/s vs hf: " + "; ".join(f"{t} new tokens " + ", ".join(f"{k} {v}x" for k, v in r.items())
                                              for t, r in rec["x_hf_tokens_per_s"].items())
    if name == "draw":
        return ("inverse_cdf / multinomial per call: " + ", ".join(f"{k} {v}x" for k, v in
                                                                   rec["inverse_cdf_x_multinomial"].items())
                + "; largest frequency deviation (standard errors): "
                + ", ".join(f"{k} {v}" for k, v in rec["max_z"].items()))
    if name == "parity":
        f32, b16 = rec.get("float32_logits_vs_float32_forward", {}), rec.get("bf16_logits_vs_float32_forward", {})
        return "; ".join(f"{k}: max |d logp| vs transformers {rec[k]:.3g}, mean |d logp| vs a float32 forward "
                         f"{f32.get(k, float('nan')):.3g} with float32 logits ({b16.get(k, float('nan')):.3g} "
                         "bf16-rounded)" for k in ("sdpa", "flash_attention_2") if k in rec)
    if name == "loss_bench":
        top = rec["summary"][max(rec["summary"], key=int)]
        best = top["best_chunked"] or {}
        return (f"N*T={max(rec['summary'], key=int)}: naive {top['naive_mb']} MB / best chunked "
                f"{best.get('peak_mem_mb')} MB ({best.get('strategy')}, {best.get('chunk')}); "
                f"max rel grad err {top['max_rel_grad_err']:.2g}")
    res = rec["result"]
    s = res["summary"]["step"]
    text = f"step {s['seconds']:.1f} s, peak {s['peak_gb']:.2f} GiB" + (
        f" (reserved {s['reserved_gb']:.2f})" if s["reserved_gb"] is not None else "")
    if "goal" in rec and rec["goal"]["fits"] is not None:
        text += f", {'fits' if rec['goal']['fits'] else 'does NOT fit'} the {rec['goal']['goal_gib']:.0f} GiB goal"
    if name == "fsdp_step":
        text += f", backend {rec.get('backend')}, sharded {res['sharded']}"
    return text


def _summary_rows(summary: dict) -> list[str]:
    fmt = lambda x: "" if x is None else f"{x:.2f}"  # noqa: E731
    lines = ["| phase | seconds | peak allocated GiB | peak reserved GiB |", "|---|---:|---:|---:|"]
    for phase, v in summary.items():
        lines.append(f"| {phase} | {v['seconds']:.2f} | {fmt(v['peak_gb'])} | {fmt(v['reserved_gb'])} |")
    return lines


def _phase_table(res: dict) -> list[str]:
    setup = res["setup"]
    note = (f"\nweights at rest {setup['allocated_gb']:.2f} GiB (built in {setup['seconds']:.1f} s); "
            f"{res['arch']}, {res['parameters'] / 1e9:.2f}B parameters, G={res['group_size']}, "
            f"{res['max_new_tokens']} new tokens (full length: {res['full_length_ok']}), {res['strategy']}, "
            f"{res['precision']}; memory: {res['memory']}")
    return [*_summary_rows(res["summary"]), note]


def _partial_table(progress: dict) -> list[str]:
    """Per-phase figures of the steps a failed step part got through (the failing phase included)."""
    from ktr.experiments.bench_step import summarise

    setup = progress.get("setup") or {}
    return [*_summary_rows(summarise(progress["steps"])),
            f"\nweights at rest {setup.get('allocated_gb')} GiB; {len(progress['steps'])} step(s) started"]


def markdown(report: dict) -> str:
    env = report["environment"]
    v = env["versions"]
    machine = (f"{env.get('gpu') or env['cpu']} ({env.get('gpu_memory_gib', '-')} GiB); torch {v['torch']} "
               f"(CUDA {env['cuda']}), transformers {v['transformers']}, lightning {v['lightning']}, "
               f"peft {v['peft']}, bitsandbytes {v['bitsandbytes']}, flash-attn {v['flash-attn']}; "
               f"{report['seconds']} s in all (budget {report['budget_s']:.0f} s); float32 head logits: "
               f"{report.get('float32_output_gemm', '-')}")
    lines = [f"# ktr GPU check ({report['mode']})", "", machine, "",
             "| part | status | seconds | headline |", "|---|---|---:|---|"]
    for name, rec in report["parts"].items():
        lines.append(f"| {name} | {rec['status']} | {rec['seconds']} | {_headline(name, rec)} |")
    for name in ("qlora_step", "qlora_step_naive", "qlora_step_grpo", "fsdp_step"):
        rec = report["parts"].get(name)
        if rec and rec["status"] == "ok":
            lines += ["", f"## {name}", "", *_phase_table(rec["result"])]
        elif rec and (rec.get("measured") or {}).get("progress", {}).get("steps"):
            lines += ["", f"## {name} ({rec['status']}): what was measured before it stopped", "",
                      *_partial_table(rec["measured"]["progress"])]
    naive, chunked = report["parts"].get("qlora_step_naive"), report["parts"].get("qlora_step")
    if chunked and chunked["status"] == "ok" and chunked.get("ktr_vs_grpo"):
        summary, est = chunked["result"]["summary"], chunked["ktr_vs_grpo"]
        memory = "" if est["memory_x"] is None else f", peak memory {est['memory_x']:.2f}x (goal <= 1.05)"
        lines += ["", f"qlora_step: probes {summary['probes']['seconds']:.2f} s of a {summary['step']['seconds']:.2f} "
                      f"s step, so Video-KTR / GRPO ~ {est['time_x']:.2f} in time (goal <= 1.10){memory}; GRPO: the "
                      "step without its probes phase"]
    grpo = report["parts"].get("qlora_step_grpo")
    if grpo and chunked and grpo["status"] == chunked["status"] == "ok":
        k, g = chunked["result"]["summary"]["step"], grpo["result"]["summary"]["step"]
        lines += ["", f"qlora_step vs qlora_step_grpo, measured: Video-KTR / GRPO {k['seconds'] / g['seconds']:.2f} in "
                      f"time ({k['seconds']:.2f} / {g['seconds']:.2f} s, goal <= 1.10), "
                      f"{k['peak_gb'] / g['peak_gb']:.2f} in peak memory ({k['peak_gb']:.2f} / {g['peak_gb']:.2f} GiB, "
                      "goal <= 1.05)"]
    if naive and chunked and naive["status"] == chunked["status"] == "ok":
        a, b = naive["result"]["summary"]["step"]["peak_gb"], chunked["result"]["summary"]["step"]["peak_gb"]
        lines += ["", f"naive / chunked step peak: {a:.2f} / {b:.2f} GiB = {a / b:.2f}"]
    return "\n".join(lines) + "\n"

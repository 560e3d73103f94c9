"""vLLM rollout backend (`sampling.backend: vllm`, layer L2; `pip install 'ktr[vllm]'`).

Each rank runs its own colocated, in-process vLLM engine (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), built lazily on the
first `generate` from the policy's config with dummy weights, then loaded with the policy's current weights. After
every optimizer step `on_weights_updated` pushes the weights again (`reload_weights` with transformers' parameter
names; LoRA merged; under FSDP2 each parameter gathered in turn) and clears the engine's prefix, multimodal and
encoder caches: without the encoder-cache reset the next request on the same media fails ("Encoder cache miss").

Memory (`ktr.rollout.vllm_memory`, docs/vllm.md): the engine is sized from the step (`max_num_seqs` = G x
prompts, `max_num_batched_tokens`, a KV cache for those sequences at full length; `sampling.vllm.memory:
fraction` keeps the bare fraction), sleeps after a step's rollouts (`release`; `sampling.vllm.sleep`, default
level 1; an evaluator releases it after its last batch), wakes
its weights for the sync and its KV cache before the next rollout, and records its memory after each phase
(`train/rollout/memory_gib/<phase>`). vLLM's CPU engine has no sleep mode: there the scheduler is paused instead,
the same calls in the same order, nothing freed.

What the engine sees is what the scoring passes see:
- prompts are ktr's own token ids, each run of vision placeholders collapsed to one token that vLLM expands
  again; the expanded prompt is checked against ktr's (a mismatch raises, naming the sample);
- media (`sampling.vllm.media`): `embeds` (default) hands the engine the features of the policy's own vision
  tower (one vision call per batch, as the scoring passes), so the engine's copy of the tower is never used;
  `frames` hands it ktr's processed frames (already resized, so the engine's processor keeps their size and
  makes the same pixel values, checked to 2e-7) and the engine encodes them with its copy of the tower. Images
  only: on a video the CPU engine's tower (vLLM 0.32) gave other greedy tokens than transformers' on the same
  pixels (not found why), so a video prompt raises rather than sampling from other features than those scored;
- sampling: temperature, top-p, top-k as `SamplingConfig`; vision placeholder tokens get a logit bias of -100
  (vLLM's bound; transformers' `suppress_tokens` sets -inf); the completion ends at the first end-of-sequence
  token; seeds come from torch's global generator, so `seed_everything` makes a run repeatable.

The engine also returns the sampled tokens' log-probs (raw logits, before temperature / top-p: the quantity the
policy pass computes); they ride on `Rollout.logps` for `train/rollout/logp_diff` and `loss.rollout_correction`.

Positions after a video: transformers 5's Qwen2.5-VL `get_rope_index` continues the text at
`start + max(h, w) / merge`, vLLM (like Qwen's reference code and transformers 4.x) at `max(t, h, w) + 1`
(measured with transformers 5.19 and 5.24, vLLM 0.32). ktr's passes follow the reference rule by default
(`policy.rope_after_media: reference`, `ktr.model.rope`), so the engine samples at the positions the policy scores;
under `rope_after_media: transformers` they differ on videos whose temporal extent exceeds the spatial one, and
`train/rollout/logp_diff` shows it (`loss.rollout_correction: tis` corrects for it).

Supported families: Qwen2.5-VL, Qwen2-VL and Qwen3-VL. Qwen3-VL (`media: embeds`): the engine gets the main and
deepstack features side by side and each video's per-patch timestamps; the timestamped blocks of ktr's prompt are
collapsed to what vLLM's processor expands back (`collapse_video_blocks`), and the check above compares the
result; vLLM's positions after a Qwen3-VL video equal transformers' (no gap). `media: frames` is refused on
Qwen3-VL: on an image whose pixels the engine's processor reproduced to 6e-8, the engine's greedy tokens left
transformers' after the first one (vLLM 0.32 CPU; not found why). 4-bit (`policy.quantization: nf4`)
keeps the HF path (a ConfigError at construction). Tested on vLLM's CPU engine (`tests/vllm`); the CUDA engine,
sleep mode (CUDA only), colocated GPU memory sharing and the FSDP2 gather are written but untested here.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from ktr.config import SamplingConfig, VLLMSettings
from ktr.data.processor import VisionLanguageProcessor, frame_times_of, patch_times
from ktr.model.families import core, family_of
from ktr.rollout.base import (RolloutBackend, assemble_rollout, check_prompt_lengths, end_of_sequence_ids,
                              suppressed_token_ids)
from ktr.rollout.vllm_memory import (SLEEP_LEVELS, EnginePlan, EngineSleep, MemoryTimeline, engine_memory_kwargs,
                                     plan_engine, sleep_mode_available)
from ktr.types import PromptBatch, Rollout

SUPPORTED_FAMILIES = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl")
SUPPRESS_BIAS = -100.0  # vLLM clamps logit biases to [-100, 100]


def require_vllm():
    """The `vllm` module, or an ImportError naming the extra to install."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: weights are pushed by reference
    try:
        import vllm
    except ImportError as err:
        raise ImportError("sampling.backend: vllm needs vLLM: pip install 'ktr[vllm]' (CPU: see README)") from err
    return vllm


# --------------------------------------------------------------------------------------------------- weights


def _full(t: Tensor) -> Tensor:
    """The whole tensor of a (possibly FSDP2-sharded) parameter: DTensors are all-gathered."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def policy_weights(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """`(name, tensor)` of the policy in transformers' checkpoint names, one parameter at a time.

    LoRA (peft): adapters merged into their base weights (`W + scale * B A`, the policy's own weights untouched),
    adapter tensors left out. FSDP2: each DTensor is gathered when it is reached, so at most one full parameter
    is alive at a time (every rank must iterate, in the same order: they do, after the same optimizer step).
    """
    base = core(model)
    lora = {name: m for name, m in base.named_modules() if hasattr(m, "get_delta_weight") and hasattr(m, "base_layer")}
    for name, tensor in base.state_dict().items():
        if ".lora_" in name:
            continue
        clean = name.replace(".base_layer.", ".")
        weight = _full(tensor).detach()
        owner = clean.rpartition(".")[0]
        if name.endswith(".base_layer.weight") and owner in lora:
            module = lora[owner]
            for adapter in module.active_adapters:
                if adapter in module.lora_A and adapter not in getattr(module, "merged_adapters", []):
                    weight = weight + _full(module.get_delta_weight(adapter)).detach().to(weight.dtype)
        yield clean, weight


# --------------------------------------------------------------------------------------------------- engine


def _engine_dir(model: nn.Module, processor: VisionLanguageProcessor) -> Path:
    """A folder with the policy's config, tokenizer and processor settings (no weights: the engine starts with
    dummy weights and receives the policy's through `reload_weights`)."""
    from ktr.data.video import ImageSettings, VideoSettings
    from ktr.model.policy import Policy
    from ktr.model.saving import write_processor_config  # the one definition of ktr's HF processor files

    out = Path(tempfile.mkdtemp(prefix="ktr-vllm-"))
    config = copy.deepcopy(core(model).config)
    config.architectures = [type(core(model)).__name__]  # how vLLM picks its model class
    config.save_pretrained(out)
    processor.tokenizer.save_pretrained(out)
    # Pixel bounds wide open: ktr's frames are already resized, the engine's processor must keep their size.
    b = processor.resize_factor
    video = VideoSettings(min_pixels=b * b, max_pixels=16384 * b * b, factor=b)
    image = ImageSettings(min_pixels=b * b, max_pixels=16384 * b * b)
    write_processor_config(Policy(model=model, processor=processor), out, video, image)
    return out


def _dtype(model: nn.Module, setting: str) -> str:
    if setting != "auto":
        return setting
    dtype = next(core(model).parameters()).dtype
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]


def build_engine(model: nn.Module, processor: VisionLanguageProcessor, cfg: SamplingConfig, plan: EnginePlan):
    """A vLLM `LLM` for `model` on this rank, sized by `plan` (`ktr.rollout.vllm_memory`), holding the policy's
    current weights."""
    family = family_of(model).model_type
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(f"sampling.backend: vllm supports {list(SUPPORTED_FAMILIES)} policies, got {family!r}; "
                         "use sampling.backend: shared or hf")
    settings: VLLMSettings = cfg.vllm
    vllm = require_vllm()
    kwargs = {}
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        kwargs["distributed_executor_backend"] = "external_launcher"  # one engine per rank (untested here)
    on_cuda = torch.cuda.is_available()
    kwargs.update(engine_memory_kwargs(plan, cfg, on_cuda))
    if settings.sleep != "never" and sleep_mode_available():
        kwargs["enable_sleep_mode"] = True
    with _cpu_kv_setting(settings):
        engine = vllm.LLM(
            model=str(_engine_dir(model, processor)), load_format="dummy", dtype=_dtype(model, settings.dtype),
            max_model_len=plan.max_model_len, enforce_eager=settings.enforce_eager, enable_mm_embeds=True,
            limit_mm_per_prompt={"image": 1, "video": 1}, enable_prefix_caching=True, seed=settings.seed, **kwargs)
    load_weights(engine, model)
    return engine


@contextmanager
def _cpu_kv_setting(settings: VLLMSettings):
    """The CPU engine reads `VLLM_CPU_KVCACHE_SPACE` (GiB) over `kv_cache_memory_bytes`: `memory: fraction` sets
    it to kv_cache_gib (unless set already), `memory: derived` hides it while the engine is built."""
    key = "VLLM_CPU_KVCACHE_SPACE"
    if settings.memory == "fraction":
        os.environ.setdefault(key, f"{settings.kv_cache_gib:g}")
        yield
        return
    old = os.environ.pop(key, None)
    try:
        yield
    finally:
        if old is not None:
            os.environ[key] = old


def load_weights(engine, model: nn.Module) -> None:
    """Push the policy's weights into `engine` and drop every cache computed with the old ones."""
    engine.collective_rpc("reload_weights", kwargs={"weights_iterator": policy_weights(model),
                                                    "is_checkpoint_format": True})
    engine.reset_prefix_cache()
    engine.reset_mm_cache()
    engine.llm_engine.reset_encoder_cache()


# --------------------------------------------------------------------------------------------------- requests


def collapse_placeholders(ids: list[int], placeholder_ids: tuple[int, ...]) -> list[int]:
    """`ids` with each run of a vision placeholder token kept as one token (vLLM expands it from the grid).

    >>> collapse_placeholders([1, 9, 9, 9, 2, 8, 8, 3], (8, 9))
    [1, 9, 2, 8, 3]
    """
    return [t for j, t in enumerate(ids) if not (t in placeholder_ids and j > 0 and ids[j - 1] == t)]


def engine_requests(model: nn.Module, processor: VisionLanguageProcessor, batch: PromptBatch,
                    media: str) -> tuple[list[dict], list[list[int]]]:
    """vLLM prompts of the B prompts and ktr's unpadded prompt ids `[B][L_b]` (what the engine must expand to)."""
    config = core(model).config
    placeholders = (config.image_token_id, config.video_token_id)
    scaled = family_of(model).video_time_scaling
    features = None
    if media == "embeds":
        from ktr.model.forward import encode_media

        features = encode_media(model, batch.pixel_values, batch.grid_thw)  # B x [n_b, H] (+ deepstack)
    requests, expected = [], []
    for i, m in enumerate(batch.media):
        ids = batch.input_ids[i][batch.attention_mask[i].bool()].tolist()
        grid = batch.grid_thw[i: i + 1].cpu()  # [1, 3]
        stamped = m.kind == "video" and processor.layout.timestamps  # Qwen3-VL: one block per temporal patch
        if features is not None:
            key = "video" if m.kind == "video" else "image"
            data = {f"{key}_embeds": _engine_features(features, i), f"{key}_grid_thw": grid}
            if key == "video" and scaled:
                data["second_per_grid_ts"] = batch.second_per_grid_ts[i: i + 1].cpu()
            if stamped:
                data["timestamps"] = [patch_times(frame_times_of(m), processor.patch.temporal_patch_size)]  # [1][T]
            mm = {key: data}
        elif family_of(model).model_type == "qwen3_vl":
            raise ValueError("sampling.vllm.media: frames is refused on Qwen3-VL (vLLM's vision tower gave other "
                             "features than the policy's on the same pixels, see docs/vllm.md); use media: embeds")
        elif m.kind == "video":
            raise ValueError("sampling.vllm.media: frames serves images only (on videos vLLM's vision tower disagrees "
                             "with the policy's, see ktr.rollout.vllm); use sampling.vllm.media: embeds")
        else:
            mm = {m.kind: _frames_input(m)}
        prompt = (collapse_video_blocks(ids, batch.media_block[i][batch.attention_mask[i].bool()].tolist(), config,
                                        processor.layout.wrapper) if stamped
                  else collapse_placeholders(ids, placeholders))
        requests.append({"prompt_token_ids": prompt, "multi_modal_data": mm})
        expected.append(ids)
    return requests, expected


def _engine_features(features, i: int) -> Tensor:
    """Prompt i's features as the engine takes them: `[n, H]`, or with deepstack (Qwen3-VL) the main and each
    deepstack layer's features side by side, `[n, H * (1 + L)]` (the vision tower's output layout in vLLM)."""
    main = features.per_prompt[i]
    if features.deepstack is None:
        return main.detach().cpu()
    return torch.cat([main, *features.deepstack[i]], dim=-1).detach().cpu()


def engine_video_target(config) -> list[int]:
    """The tokens the engine's Qwen3-VL processor replaces with the timestamped blocks: the bare video token with
    transformers >= 5.10's processors (they override `replace_video_token`), else vision start, video, end
    (the rule of vLLM's `Qwen3VLMultiModalProcessor._expands_only_video_token`)."""
    from transformers import ProcessorMixin, Qwen3VLProcessor

    own = getattr(Qwen3VLProcessor, "replace_video_token", None)
    if own is not None and own is not getattr(ProcessorMixin, "replace_video_token", None):
        return [config.video_token_id]
    return [config.vision_start_token_id, config.video_token_id, config.vision_end_token_id]


def collapse_video_blocks(ids: list[int], block: list[bool], config, wrapper: str) -> list[int]:
    """A timestamped video prompt (Qwen3-VL) with its blocks `<t seconds><vs><video>*n<ve>...` replaced by what
    the engine expands to those blocks (`engine_video_target`); `block` marks the media block (`PromptBatch.
    media_block`: the blocks, or with `video_wrapper: keep` the outer start/end pair around them, kept)."""
    first = block.index(True)
    last = len(block) - 1 - block[::-1].index(True)
    target = engine_video_target(config)
    middle = [ids[first], *target, ids[last]] if wrapper == "keep" else target
    return ids[:first] + middle + ids[last + 1:]


def _frames_input(media):
    """ktr's processed frames as vLLM raw media: a PIL image, or `(frames [F, H, W, 3] uint8, metadata)`."""
    frames = media.frames.permute(0, 2, 3, 1).contiguous().cpu().numpy()  # [F, H, W, 3]
    if media.kind == "image":
        from PIL import Image

        return Image.fromarray(frames[0])
    n = frames.shape[0]
    fps = float(media.sample_fps)
    return frames, {"fps": fps, "frames_indices": list(range(n)), "total_num_frames": n, "duration": n / fps,
                    "do_sample_frames": False}


def sampling_params(model: nn.Module, processor: VisionLanguageProcessor, cfg: SamplingConfig, n: int,
                    greedy: bool):
    """vLLM `SamplingParams` of `cfg` with n samples per prompt and the sampled tokens' log-probs."""
    vllm = require_vllm()
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())  # torch's global RNG: seed_everything repeats a run
    common = dict(n=n, max_tokens=cfg.max_new_tokens, logprobs=0, stop_token_ids=end_of_sequence_ids(processor),
                  logit_bias={t: SUPPRESS_BIAS for t in suppressed_token_ids(model)}, seed=seed,
                  skip_special_tokens=False, detokenize=False)
    if greedy or cfg.temperature == 0:
        return vllm.SamplingParams(temperature=0.0, **common)
    return vllm.SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k or -1, **common)


def per_request_seeds(params, count: int) -> list:
    """`count` copies of `params` (vLLM `SamplingParams`), request `i` seeded `seed + i * n`. vLLM seeds sample `j`
    of a request with `seed + j`, so one `SamplingParams` for every request gave sample `j` of every prompt the same
    random draws (correlated completions across the prompts of a rank); these seeds never overlap."""
    out = []
    for i in range(count):
        one = params.clone()
        if params.seed is not None:
            one.seed = params.seed + i * params.n
        out.append(one)
    return out


def _completion_tensors(outputs, expected: list[list[int]], rows: list[dict], repeat: int,
                        pad_id: int) -> tuple[Tensor, Tensor]:
    """Completion ids `[N, T]` (pad after the end) and their log-probs `[N, T]` (0 after the end)."""
    tokens, logps = [], []
    for i, out in enumerate(outputs):
        if list(out.prompt_token_ids) != expected[i]:
            raise RuntimeError(f"vLLM expanded the prompt of sample {rows[i].get('problem_id', i)!r} to "
                               f"{len(out.prompt_token_ids)} tokens, ktr's has {len(expected[i])}: the engine would "
                               "sample from another prompt than the one scored")
        for c in out.outputs:
            ids = list(c.token_ids) or [pad_id]
            lp = [float(step[t].logprob) for step, t in zip(c.logprobs, c.token_ids)] or [0.0]
            for _ in range(repeat):
                tokens.append(ids)
                logps.append(lp)
    t = max(len(r) for r in tokens)
    ids = torch.tensor([r + [pad_id] * (t - len(r)) for r in tokens], dtype=torch.long)  # [N, T]
    lps = torch.tensor([r + [0.0] * (t - len(r)) for r in logps], dtype=torch.float32)  # [N, T]
    return ids, lps


class VLLMBackend(RolloutBackend):
    """A colocated in-process vLLM engine (see the module docstring); built on the first `generate`, asleep from
    `release` (after a step's rollouts) to the next sync or `generate` (`sampling.vllm.sleep`); `timeline`
    records its phases and memory."""

    def __init__(self) -> None:
        self.engine = None
        self.plan: EnginePlan | None = None
        self.sleeper: EngineSleep | None = None
        self.timeline = MemoryTimeline()

    def generate(self, model: nn.Module, processor: VisionLanguageProcessor, batch: PromptBatch,
                 cfg: SamplingConfig, group_size: int | None = None, greedy: bool = False) -> Rollout:
        """G completions per prompt (rows `i*G .. i*G+G-1` of prompt `i`), with `Rollout.logps` `[N, T]`."""
        g = group_size or cfg.group_size
        check_prompt_lengths(batch, cfg)
        if self.engine is None:
            self._build(model, processor, cfg, prompts=batch.input_ids.shape[0])
        greedy = greedy or cfg.temperature == 0
        with torch.no_grad():
            requests, expected = engine_requests(model, processor, batch, cfg.vllm.media)
        params = sampling_params(model, processor, cfg, 1 if greedy else g, greedy)  # vLLM: greedy needs n = 1
        self.wake(model)
        outputs = self.engine.generate(requests, per_request_seeds(params, len(requests)), use_tqdm=False)
        self.timeline.record("generated", requests=len(requests), samples=len(requests) * (1 if greedy else g))
        ids, lps = _completion_tensors(outputs, expected, batch.rows, g if greedy else 1, processor.pad_token_id)
        device = batch.input_ids.device
        rollout = assemble_rollout(batch, ids.to(device), g, processor, end_of_sequence_ids(processor))
        rollout.logps = lps.to(device).masked_fill(~rollout.completion_mask, 0.0)  # [N, T]
        return rollout

    def _build(self, model: nn.Module, processor: VisionLanguageProcessor, cfg: SamplingConfig, prompts: int) -> None:
        dtype = {"float32": 4, "bfloat16": 2, "float16": 2}[_dtype(model, cfg.vllm.dtype)]
        self.plan = plan_engine(model, cfg, prompts, dtype)
        self.engine = build_engine(model, processor, cfg, self.plan)
        self.timeline.record("built", **self.plan.as_dict())
        self.sleeper = EngineSleep(self.engine, SLEEP_LEVELS[cfg.vllm.sleep], sleep_mode_available(), self.timeline)

    def wake(self, model: nn.Module) -> None:
        """Everything awake, the weights current (after a level-2 sleep without a sync since: they are pushed)."""
        if "weights" in self.sleeper.asleep:
            self.sleeper.wake_weights()
            if self.sleeper.weights_lost:
                load_weights(self.engine, model)
        self.sleeper.wake_kv_cache()

    def release(self) -> None:
        """The engine sleeps (`sampling.vllm.sleep`): scoring, backward and the optimizer step get its memory."""
        if self.sleeper is not None:
            self.sleeper.sleep()

    def on_weights_updated(self, model: nn.Module) -> None:
        """Wake the weights (not the KV cache), push the policy's, drop the caches computed with the old ones."""
        if self.engine is not None:
            self.sleeper.wake_weights()
            load_weights(self.engine, model)
            self.timeline.record("synced")

    def metrics(self) -> dict[str, float]:
        return self.timeline.metrics()

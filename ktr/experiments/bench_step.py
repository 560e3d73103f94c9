"""Memory and time of a few KTR training steps, split by phase, with random weights of the real architecture
(layer L4: builds the LightningModule and runs a Trainer). `scripts/bench_step.py` is its command line.

The model is built from the architecture's config with random initialisation (nothing is downloaded), then
goes through the same loading steps as a checkpoint (4-bit quantisation, LoRA, gradient checkpointing) and
trains on synthetic videos with the config's frame settings. A random model almost never emits an end token,
so every completion runs to `max_new_tokens`: the worst case for memory and time.

Phases (one training step): rollout (`generate`), scoring passes (vision features, the policy pass kept for
the gradient, reference log-probs), probes (visual and temporal counterfactual passes), backward (the masked
loss, micro-batched), optimizer (clipping, step). On CUDA each phase's peak allocated memory is measured
(`torch.cuda.max_memory_allocated`, reset at the start of each phase) and the GPU is synchronised around it.
The peak reserved memory (`torch.cuda.max_memory_reserved`, what the caching allocator holds: what must fit
on the card) is recorded alongside. Before the first step the allocator's cache is emptied, so the phases do not
inherit the random initialisation's full-precision 7B copy (a checkpoint is quantised while it loads); the
weights at rest after loading are reported as `setup`.
Without a GPU the built-in tiny model runs on CPU and memory is the process's peak RSS (monotonic).
Runs on one device even for a multi-GPU config (the FSDP strategy is not used), unless `measure` is given a
`strategy` (`ktr.experiments.gpu_check` runs a one-GPU `ModelParallelStrategy` step that way).

`measure(...)` is the entry point (used by `scripts/bench_step.py`, `scripts/bench_prefix.py` and
`ktr.experiments.gpu_check`).

Every step timed is an RL step: a config's SFT warm start (`warm_start_steps`, e.g. the demo's 90) is
set to 0 here.
"""

from __future__ import annotations

import contextlib
import gc
import json
import platform
import resource
import time

import torch

ARCHS = {
    # Qwen2.5-VL-7B-Instruct (and Video-R1/Qwen2.5-VL-7B-COT-SFT, same shapes)
    "qwen2.5-vl-7b": dict(
        family="qwen2_5_vl",
        text=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                  num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                  rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2, window_size=112,
                    fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu", in_channels=3),
    ),
    # Qwen3-VL-8B-Instruct / -Thinking (config.json of the released checkpoints): deepstack after vision blocks
    # 8, 16, 24 into decoder layers 0-2, interleaved mRoPE
    "qwen3-vl-8b": dict(
        family="qwen3_vl",
        text=dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                  rms_norm_eps=1e-6, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_interleaved": True,
                                   "mrope_section": [24, 20, 20]}),
        vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                    patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                    deepstack_visual_indexes=[8, 16, 24], hidden_act="gelu_pytorch_tanh", in_channels=3),
    ),
    # Qwen/Qwen3.5-9B (config.json of the released checkpoint; Qwen3.6 dense shares the architecture): 32 hybrid
    # layers (three Gated DeltaNet, then one gated full-attention), no deepstack, untied 248320-row head. The
    # checkpoint's multi-token-prediction layer (`mtp.*`, ~0.24B) is not part of transformers' model.
    "qwen3.5-9b": dict(
        family="qwen3_5",
        text=dict(vocab_size=248320, hidden_size=4096, intermediate_size=12288, num_hidden_layers=32,
                  num_attention_heads=16, num_key_value_heads=4, head_dim=256, linear_num_key_heads=16,
                  linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
                  linear_conv_kernel_dim=4, full_attention_interval=4, max_position_embeddings=262144,
                  rms_norm_eps=1e-6, eos_token_id=248044, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "mrope_interleaved": True,
                                   "mrope_section": [11, 11, 10], "partial_rotary_factor": 0.25}),
        vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                    patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                    hidden_act="gelu_pytorch_tanh", in_channels=3),
        ids=dict(image_token_id=248056, video_token_id=248057, vision_start_token_id=248053,
                 vision_end_token_id=248054),
    ),
}
_CONFIG_CLASSES = {"qwen2_5_vl": "Qwen2_5_VLConfig", "qwen3_vl": "Qwen3VLConfig", "qwen3_5": "Qwen3_5Config"}
_QWEN2_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                  vision_end_token_id=151653)
PHASES = ("rollout", "scoring", "probes", "backward", "optimizer")


def arch_family(name: str):
    from ktr.model.families import get_family

    return get_family(ARCHS[name]["family"])


def arch_config(name: str, text_layers: int | None = None, vision_depth: int | None = None):
    """The transformers config of architecture `name`; `text_layers`/`vision_depth` cut its depth (same widths)."""
    import transformers

    a = ARCHS[name]
    text, vision = dict(a["text"]), dict(a["vision"])
    if text_layers is not None:
        text["num_hidden_layers"] = text_layers
    if vision_depth is not None and "deepstack_visual_indexes" not in vision and "fullatt_block_indexes" not in vision:
        vision["depth"] = vision_depth  # Qwen3.5: no deepstack, no windowed blocks
    elif vision_depth is not None and "fullatt_block_indexes" in vision:
        # the last block keeps full attention, as every fourth block of the 7B tower
        vision.update(depth=vision_depth, fullatt_block_indexes=[vision_depth - 1])
    elif vision_depth is not None:  # Qwen3-VL: keep the deepstack layers that still exist (at least the last)
        kept = [i for i in vision["deepstack_visual_indexes"] if i < vision_depth] or [vision_depth - 1]
        vision.update(depth=vision_depth, deepstack_visual_indexes=kept)
    config_class = getattr(transformers, _CONFIG_CLASSES[a["family"]])
    return config_class(text_config=text, vision_config=vision, **a.get("ids", _QWEN2_IDS), tie_word_embeddings=False)


def build_random(config, device: torch.device, dtype: torch.dtype):
    """The config's `*ForConditionalGeneration` (its family's class) with random weights, created directly on
    `device` in `dtype` (on CUDA the initialisation runs on the GPU: seconds for the 7B model)."""
    from ktr.model.families import get_family

    model_class = get_family(config.model_type).load_class()
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return model_class(config)
    finally:
        torch.set_default_dtype(default)


@contextlib.contextmanager
def random_architecture(name: str | None, device: torch.device, dtype: torch.dtype,
                        text_layers: int | None = None, vision_depth: int | None = None):
    """Point the policy loader's random-init path (the family's tiny model) at a real architecture, on `device`."""
    import ktr.model.policy

    if name is None:
        yield
        return
    original = ktr.model.policy._build_tiny

    family = arch_family(name)

    def build(cfg):
        config = arch_config(name, text_layers, vision_depth)
        config._attn_implementation = cfg.attn_implementation
        return build_random(config, device, dtype), family.build_tokenizer(), family.patch_settings()

    ktr.model.policy._build_tiny = build
    try:
        yield
    finally:
        ktr.model.policy._build_tiny = original


class PhaseMeter:
    """Wall time and peak memory per phase per step."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.steps: list[dict] = []

    def wrap(self, phase: str, fn):
        def timed(*args, **kwargs):
            self._sync()
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._sync()
                rec = self.steps[-1].setdefault(phase, {"seconds": 0.0, "peak_gb": 0.0, "reserved_gb": None})
                rec["seconds"] += time.perf_counter() - start
                rec["peak_gb"] = max(rec["peak_gb"], self._peak_gb())
                if self.cuda:
                    rec["reserved_gb"] = max(rec["reserved_gb"] or 0.0, torch.cuda.max_memory_reserved() / 2**30)

        return timed

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def _peak_gb(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB, process peak so far

    def at_rest(self) -> dict:
        """Memory held now (after loading: the weights), and the cache is emptied so phases start clean."""
        if not self.cuda:
            return {"allocated_gb": self._peak_gb(), "reserved_gb": None}
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return {"allocated_gb": torch.cuda.memory_allocated() / 2**30,
                "reserved_gb": torch.cuda.memory_reserved() / 2**30}


def build_module(config: dict, arch: str | None, device: torch.device, overrides: dict,
                 text_layers: int | None = None, vision_depth: int | None = None):
    """The config's KTRModule, its policy random-initialised with architecture `arch` (None: the tiny model).

    `overrides`: `{"section.key": value}` of the module's init args (`{"loss.chunk_size": None}`)."""
    from jsonargparse import ArgumentParser

    from ktr.model.families import tiny_family
    from ktr.training.base import PolicyModule

    model_cfg = json.loads(json.dumps(config["model"]))  # deep copy
    init = model_cfg.setdefault("init_args", {})
    policy = init.setdefault("policy", {})
    if arch is not None:  # the family's random-init path, re-pointed at the architecture
        policy["name_or_path"] = arch_family(arch).tiny_name
    elif tiny_family(policy.get("name_or_path", "")) is None:  # a real checkpoint's config: its tiny stand-in
        policy["name_or_path"] = "tiny"
    policy.pop("adapter_path", None)
    for key, value in overrides.items():
        section, name = key.split(".")
        init.setdefault(section, {})[name] = value
    if init.get("warm_start_steps"):  # time RL steps, not the config's SFT warm start (demo: 90 steps)
        print(f"bench_step: warm_start_steps={init['warm_start_steps']} in the config set to 0: timing RL steps")
        init["warm_start_steps"] = 0
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(PolicyModule, "model")
    parsed = parser.parse_object({"model": model_cfg})
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        policy.get("dtype", "float32")]
    with random_architecture(arch, device, dtype, text_layers, vision_depth):
        return parser.instantiate_classes(parsed).model


def datamodule(config: dict, frames: int | None, video: dict | None = None):
    """One synthetic prompt per step with the config's frame settings (`video` overrides VideoSettings fields)."""
    from ktr.data.base import SyntheticDataModule
    from ktr.data.synthetic import SyntheticSpec
    from ktr.data.video import VideoSettings

    cfg_video = dict(((config.get("data") or {}).get("init_args") or {}).get("video") or {})
    released = dict(fps=2.0, min_frames=4, max_frames=16, min_pixels=128 * 28 * 28, max_pixels=128 * 28 * 28)
    settings = VideoSettings(**{**released, **cfg_video, **({"max_frames": frames} if frames else {}), **(video or {})})
    side = int(settings.max_pixels ** 0.5)  # square synthetic frames of about max_pixels
    spec = SyntheticSpec(num_frames=2 * settings.max_frames, size=side - side % 28, fps=settings.fps)
    return SyntheticDataModule(train_size=64, val_size=1, batch_size=1, spec=spec, video=settings, shuffle=False)


@contextlib.contextmanager
def instrumented(module, meter: PhaseMeter):
    """Time the phases of `module`'s training step into `meter`; the originals are restored on exit."""
    import ktr.module

    saved = ktr.module.attribute
    ktr.module.attribute = meter.wrap("probes", saved)
    backend = module.rollout_backend  # the module's own sampler instance (`sampling.backend`)
    backend.generate = meter.wrap("rollout", backend.generate)
    methods = {"score": "scoring", "update": "backward", "_optimizer_step": "optimizer"}
    for name, phase in methods.items():
        setattr(module, name, meter.wrap(phase, getattr(module, name)))
    try:
        yield
    finally:
        ktr.module.attribute = saved
        backend.__dict__.pop("generate", None)
        for name in methods:
            module.__dict__.pop(name, None)


def force_full_length(module) -> None:
    """Every completion runs to `max_new_tokens`: end tokens are suppressed until then (`min_new_tokens`).

    A random model rarely emits an end token anyway; this makes the measured length exact, the worst case."""
    from ktr.model.families import core

    core(module.model).generation_config.min_new_tokens = module.sampling.max_new_tokens


def narrow_head(model, vocab: int):
    """Cut the output projection to its first `vocab` rows; returns a callable that puts the full one back.

    A bench model then spends its time in the decoder, as a 7B does (its 151,936-wide head is ~1/12 of a
    token's cost), instead of in a random head that outweighs a small decoder. Completions are ids below
    `vocab`; the end tokens lie beyond it, so every completion runs to `max_new_tokens`. The rollouts'
    suppressed ids (vision placeholders) are mapped into range (`id % vocab`) until the restore."""
    import ktr.rollout.hf
    import ktr.rollout.shared
    from ktr.model.families import core

    model = core(model)
    full = model.lm_head
    if vocab >= full.out_features:
        return lambda: None
    head = torch.nn.Linear(full.in_features, vocab, bias=full.bias is not None, device=full.weight.device,
                           dtype=full.weight.dtype)
    with torch.no_grad():
        head.weight.copy_(full.weight[:vocab])
        if full.bias is not None:
            head.bias.copy_(full.bias[:vocab])
    head.requires_grad_(full.weight.requires_grad)
    original = ktr.rollout.shared.suppressed_token_ids
    model.lm_head = head
    ktr.rollout.hf.suppressed_token_ids = ktr.rollout.shared.suppressed_token_ids = (
        lambda m: [t % vocab for t in original(m)])

    def restore() -> None:
        model.lm_head = full
        ktr.rollout.hf.suppressed_token_ids = ktr.rollout.shared.suppressed_token_ids = original

    return restore


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def measure(config_paths, *, steps: int = 3, arch: str | None = "auto", device: str = "auto",
            frames: int | None = None, overrides: dict | None = None, video: dict | None = None, strategy=None,
            text_layers: int | None = None, vision_depth: int | None = None, full_length: bool = True,
            progress: dict | None = None, head_scale: float = 1.0, head_vocab: int | None = None) -> dict:
    """Train `steps` steps of the merged configs and return memory and time per phase (see the module docstring).

    `arch`: "auto" (the 7B architecture on CUDA, the tiny model on CPU), a name in `ARCHS`, or None (tiny);
    `text_layers`/`vision_depth` cut its depth. `overrides`: module init args (`{"loss.chunk_size": None}`);
    `video`: VideoSettings fields of the synthetic data; `strategy`: a Lightning strategy (default: one device).
    `progress`: filled as the run goes (setup, then the steps' records), so a caller keeps what was measured
    when a later phase fails (out of memory, time guard). `head_scale` multiplies the output projection's
    weights before the first step (a random model's flat next-token distribution made peaked, as a trained model's);
    `head_vocab` narrows it to its first rows for the run (`narrow_head`: a decoder-dominated bench model).
    """
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from ktr.model.trained import read_configs

    config = read_configs(config_paths)
    dev = _device(device)
    arch = ("qwen2.5-vl-7b" if dev.type == "cuda" else None) if arch == "auto" else arch
    L.seed_everything(config.get("seed_everything", 42))
    meter = PhaseMeter(dev)
    start = time.perf_counter()
    module = build_module(config, arch, dev, dict(overrides or {}), text_layers, vision_depth)
    n_params = sum(p.numel() for p in module.model.parameters())
    restore_head = narrow_head(module.model, head_vocab) if head_vocab else (lambda: None)
    if head_scale != 1.0:
        with torch.no_grad():
            module.model.lm_head.weight.mul_(head_scale)
    if full_length:
        force_full_length(module)
    setup = {"seconds": time.perf_counter() - start, **meter.at_rest()}
    if progress is not None:
        progress.update(setup=setup, steps=meter.steps)

    class Steps(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            meter.steps.append({})
            meter._sync()
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            meter._sync()
            meter.steps[-1]["step_seconds"] = time.perf_counter() - self.start
            m = trainer.callback_metrics
            meter.steps[-1]["completion_tokens"] = int(round(float(
                m.get("train/completion_length", 0)) * module.sampling.group_size))
            meter.steps[-1].update({k: float(m[f"train/{k}"]) for k in ("loss", "grad_norm") if f"train/{k}" in m})
            meter.steps[-1]["key_tokens"] = any(k.startswith("train/ktr/") for k in m)  # the probes ran and selected

    precision = (config.get("trainer") or {}).get("precision", "32-true") if dev.type == "cuda" else "32-true"
    trainer = L.Trainer(accelerator=dev.type, devices=1, precision=precision, max_steps=steps,
                        strategy=strategy or "auto", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[Steps()])
    try:
        with instrumented(module, meter):
            trainer.fit(module, datamodule(config, frames, video))
    finally:
        restore_head()
    g, t = module.sampling.group_size, module.sampling.max_new_tokens
    return {"config": [str(c) for c in config_paths], "arch": arch or module.policy_cfg.name_or_path,
            "parameters": n_params,
            "text_layers": text_layers, "vision_depth": vision_depth,
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
            "strategy": type(trainer.strategy).__name__, "sharded": bool(getattr(module, "_sharded", False)),
            "precision": precision,
            "memory": "cuda max_memory_allocated / max_memory_reserved per phase" if dev.type == "cuda"
            else "process peak RSS", "overrides": dict(overrides or {}),
            "group_size": g, "max_new_tokens": t, "full_length": full_length, "head_vocab": head_vocab,
            "head_scale": head_scale,
            "full_length_ok": all(s.get("completion_tokens") == g * t for s in meter.steps) if full_length else None,
            "step_kind": "rl", "setup": setup, "steps": meter.steps, "summary": summarise(meter.steps),
            "rollout_engine": engine_report(module.rollout_backend)}


def engine_report(backend) -> dict | None:
    """The vLLM engine's plan and its phases with memory (`ktr.rollout.vllm_memory`); None for other backends."""
    timeline = getattr(backend, "timeline", None)
    if timeline is None:
        return None
    plan = getattr(backend, "plan", None)
    return {"plan": None if plan is None else plan.as_dict(), "phases": list(timeline.phases)}


def summarise(steps: list[dict]) -> dict:
    """Mean seconds over the steps after the first (warm-up) when there are several; max peaks over all."""
    timed = steps[1:] if len(steps) > 1 else steps
    out = {}
    for phase in (*PHASES, "step"):
        key = "step_seconds" if phase == "step" else phase
        secs = [s.get(key, 0.0) if phase == "step" else s.get(phase, {}).get("seconds", 0.0) for s in timed]
        recs = [s.get(phase, {}) for s in steps] if phase != "step" else []
        reserved = [r["reserved_gb"] for r in recs if r.get("reserved_gb") is not None]
        out[phase] = {"seconds": sum(secs) / max(1, len(secs)),
                      "peak_gb": max((r.get("peak_gb", 0.0) for r in recs), default=None),
                      "reserved_gb": max(reserved, default=None)}
    phases = [v for k, v in out.items() if k != "step"]
    out["step"]["peak_gb"] = max((v["peak_gb"] for v in phases if v["peak_gb"] is not None), default=None)
    out["step"]["reserved_gb"] = max((v["reserved_gb"] for v in phases if v["reserved_gb"] is not None),
                                     default=None)
    return out


def dry_run(arch: str) -> int:
    with torch.device("meta"):
        model = arch_family(arch).load_class()(arch_config(arch))
    return sum(p.numel() for p in model.parameters())

"""Memory and time of a few KTR training steps, split by phase, with random weights of the real architecture.

    python scripts/bench_step.py --config configs/qwen7b_qlora.yaml --steps 3 --json bench_step.json
    python scripts/bench_step.py --config configs/qwen7b_qlora.yaml --arch qwen2.5-vl-7b --dry-run  # size only

The model is built from the architecture's config with random initialisation (nothing is downloaded), then
goes through the same loading steps as a checkpoint (4-bit quantisation, LoRA, gradient checkpointing) and
trains on synthetic videos with the config's frame settings. A random model almost never emits an end token,
so every completion runs to `max_new_tokens`: the worst case for memory and time.

Phases (one training step): rollout (`generate`), scoring passes (vision features, the policy pass kept for
the gradient, reference log-probs), probes (visual and temporal counterfactual passes), backward (the masked
loss, micro-batched), optimizer (clipping, step). On CUDA each phase's peak allocated memory is measured
(`torch.cuda.max_memory_allocated`, reset at the start of each phase) and the GPU is synchronised around it.
Without a GPU the built-in tiny model runs on CPU and memory is the process's peak RSS (monotonic).
Runs on one device even for a multi-GPU config (the FSDP strategy is not used).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import resource
import time
from pathlib import Path

import torch

ARCHS = {
    # Qwen2.5-VL-7B-Instruct (and Video-R1/Qwen2.5-VL-7B-COT-SFT, same shapes)
    "qwen2.5-vl-7b": dict(
        text=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                  num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                  rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2, window_size=112,
                    fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu", in_channels=3),
    ),
}
PHASES = ("rollout", "scoring", "probes", "backward", "optimizer")


def arch_config(name: str):
    from transformers import Qwen2_5_VLConfig

    a = ARCHS[name]
    return Qwen2_5_VLConfig(text_config=a["text"], vision_config=a["vision"], image_token_id=151655,
                            video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
                            tie_word_embeddings=False)


@contextlib.contextmanager
def random_architecture(name: str | None, device: torch.device, dtype: torch.dtype):
    """Point the policy loader's random-init path (`tiny`) at a real architecture, built on `device`."""
    import ktr.policy

    if name is None:
        yield
        return
    original = ktr.policy._build_tiny

    def build(cfg):
        from transformers import Qwen2_5_VLForConditionalGeneration

        from ktr.data.processor import PatchSettings
        from ktr.tokenizer import build_qwen2_tokenizer

        config = arch_config(name)
        config._attn_implementation = cfg.attn_implementation
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = Qwen2_5_VLForConditionalGeneration(config)
        finally:
            torch.set_default_dtype(default)
        return model, build_qwen2_tokenizer(), PatchSettings()

    ktr.policy._build_tiny = build
    try:
        yield
    finally:
        ktr.policy._build_tiny = original


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
                rec = self.steps[-1].setdefault(phase, {"seconds": 0.0, "peak_gb": 0.0})
                rec["seconds"] += time.perf_counter() - start
                rec["peak_gb"] = max(rec["peak_gb"], self._peak_gb())

        return timed

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def _peak_gb(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB, process peak so far


def build_module(config: dict, arch: str | None, device: torch.device, overrides: dict):
    """The config's KTRModule, its policy random-initialised with architecture `arch` (None: the tiny model)."""
    from jsonargparse import ArgumentParser

    from ktr.module import PolicyModule

    model_cfg = json.loads(json.dumps(config["model"]))  # deep copy
    init = model_cfg.setdefault("init_args", {})
    policy = init.setdefault("policy", {})
    policy["name_or_path"] = "tiny"
    policy.pop("adapter_path", None)
    for key, value in overrides.items():
        section, name = key.split(".")
        init.setdefault(section, {})[name] = value
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(PolicyModule, "model")
    parsed = parser.parse_object({"model": model_cfg})
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        policy.get("dtype", "float32")]
    with random_architecture(arch, device, dtype):
        return parser.instantiate_classes(parsed).model


def datamodule(config: dict, frames: int | None):
    from ktr.data.base import SyntheticDataModule
    from ktr.data.synthetic import SyntheticSpec
    from ktr.data.video import VideoSettings

    video = dict(((config.get("data") or {}).get("init_args") or {}).get("video") or {})
    released = dict(fps=2.0, min_frames=4, max_frames=16, min_pixels=128 * 28 * 28, max_pixels=128 * 28 * 28)
    settings = VideoSettings(**{**released, **video, **({"max_frames": frames} if frames else {})})
    side = int(settings.max_pixels ** 0.5)  # square synthetic frames of about max_pixels
    spec = SyntheticSpec(num_frames=2 * settings.max_frames, size=side - side % 28, fps=settings.fps)
    return SyntheticDataModule(train_size=64, val_size=1, batch_size=1, spec=spec, video=settings, shuffle=False)


def instrument(module, meter: PhaseMeter) -> None:
    import ktr.module

    ktr.module.generate = meter.wrap("rollout", ktr.module.generate)
    ktr.module.attribute = meter.wrap("probes", ktr.module.attribute)
    module.score = meter.wrap("scoring", module.score)
    module.update = meter.wrap("backward", module.update)
    module._optimizer_step = meter.wrap("optimizer", module._optimizer_step)


def run(args) -> dict:
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from ktr.export import read_configs

    config = read_configs(args.config)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    arch = args.arch if args.arch != "auto" else ("qwen2.5-vl-7b" if device.type == "cuda" else None)
    overrides = {"sampling.max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}
    L.seed_everything(config.get("seed_everything", 42))
    module = build_module(config, arch, device, overrides)
    n_params = sum(p.numel() for p in module.model.parameters())
    meter = PhaseMeter(device)
    instrument(module, meter)

    class Steps(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            meter.steps.append({})
            meter._sync()
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            meter._sync()
            meter.steps[-1]["step_seconds"] = time.perf_counter() - self.start
            meter.steps[-1]["completion_tokens"] = int(trainer.callback_metrics.get("train/completion_length", 0)
                                                       * module.sampling.group_size)

    precision = (config.get("trainer") or {}).get("precision", "32-true") if device.type == "cuda" else "32-true"
    trainer = L.Trainer(accelerator=device.type, devices=1, precision=precision, max_steps=args.steps,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Steps()])
    trainer.fit(module, datamodule(config, args.frames))
    return {"config": [str(c) for c in args.config], "arch": arch or "tiny", "parameters": n_params,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "memory": "cuda max_memory_allocated per phase" if device.type == "cuda" else "process peak RSS",
            "group_size": module.sampling.group_size, "max_new_tokens": module.sampling.max_new_tokens,
            "steps": meter.steps, "summary": summarise(meter.steps)}


def summarise(steps: list[dict]) -> dict:
    """Mean seconds over the steps after the first (warm-up) when there are several; max peak over all."""
    timed = steps[1:] if len(steps) > 1 else steps
    out = {}
    for phase in (*PHASES, "step"):
        key = "step_seconds" if phase == "step" else phase
        secs = [s[key] if phase == "step" else s.get(phase, {}).get("seconds", 0.0) for s in timed]
        peaks = [s.get(phase, {}).get("peak_gb", 0.0) for s in steps] if phase != "step" else []
        out[phase] = {"seconds": sum(secs) / max(1, len(secs)), "peak_gb": max(peaks, default=None)}
    out["step"]["peak_gb"] = max((v["peak_gb"] for k, v in out.items() if k != "step"), default=None)
    return out


def table(result: dict) -> str:
    lines = [f"{result['arch']} ({result['parameters'] / 1e9:.2f}B parameters) on {result['device']}, "
             f"G={result['group_size']}, max_new_tokens={result['max_new_tokens']}; memory: {result['memory']}",
             f"{'phase':<12}{'seconds':>10}{'peak GB':>10}"]
    for phase, rec in result["summary"].items():
        peak = "" if rec["peak_gb"] is None else f"{rec['peak_gb']:.2f}"
        lines.append(f"{phase:<12}{rec['seconds']:>10.3f}{peak:>10}")
    return "\n".join(lines)


def dry_run(arch: str) -> int:
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(arch_config(arch))
    return sum(p.numel() for p in model.parameters())


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", required=True, help="ktr fit config(s), merged in order")
    parser.add_argument("--steps", type=int, default=3, help="training steps (the first is reported apart)")
    parser.add_argument("--arch", default="auto", choices=["auto", *ARCHS],
                        help="auto: the 7B architecture on CUDA, the config's tiny model on CPU")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    parser.add_argument("--frames", type=int, default=None, help="override data video max_frames (default 16)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="override sampling.max_new_tokens")
    parser.add_argument("--dry-run", action="store_true", help="only build --arch on the meta device and count")
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    args = parser.parse_args(argv)
    if args.dry_run:
        arch = "qwen2.5-vl-7b" if args.arch == "auto" else args.arch
        print(f"{arch}: {dry_run(arch):,} parameters")
        return None
    result = run(args)
    print(table(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()

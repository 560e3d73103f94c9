"""Export round trip: `ktr fit` a tiny policy one step, export it, reload with `from_pretrained`, same log-probs.

Full fine-tuning, LoRA merged and the LoRA adapter alone, from a Lightning `.ckpt` and from a
`ModelParallelStrategy`-style distributed checkpoint directory; the processor settings go with the weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from ktr.config import PolicyConfig
from ktr.export import export, main
from ktr.model.forward import SequenceView, completion_hidden, completion_logps, encode_media
from ktr.model.policy import load_policy
from ktr.model.rope import use_reference_positions
from ktr.model.checkpoint import CheckpointError
from ktr.model.trained import checkpoint_weights

CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 1
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  num_sanity_val_steps: 0
  limit_val_batches: 0
model:
  class_path: ktr.module.KTRModule
  init_args:
    policy: {attn_implementation: eager, LORA}
    sampling: {group_size: 2, max_new_tokens: 6, top_p: 1.0}
    loss: {beta: 0.04}
    rewards: {names: ["tests.test_quant:text_length"]}
    optim: {lr: 0.01}
data:
  class_path: ktr.data.base.SyntheticDataModule
  init_args:
    train_size: 4
    val_size: 1
    video: {fps: 4.0, min_frames: 4, max_frames: 4, min_pixels: 3136, max_pixels: 3136}
    image: {min_pixels: 3136, max_pixels: 6272}
"""
LORA = "lora: {r: 4, alpha: 8, dropout: 0.0}"


def _train(tmp: Path, lora: bool):
    from ktr.cli import main as ktr_main

    torch.set_num_threads(1)
    cfg = tmp / "config.yaml"
    cfg.write_text(CONFIG.replace("LORA", LORA if lora else ""))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["ktr"])  # LightningCLI warns when pytest's own arguments are on sys.argv
        cli = ktr_main(["fit", "--config", str(cfg), f"--trainer.default_root_dir={tmp}"])
    (ckpt,) = tmp.rglob("*.ckpt")
    return cfg, ckpt, cli.model


@pytest.fixture(scope="module", params=["full", "lora"])
def trained(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    cfg, ckpt, module = _train(tmp, lora=request.param == "lora")
    from tests.helpers import rollout_for

    batch, rollout = rollout_for(module, n_prompts=2, group_size=2, max_new_tokens=6, image_every=2, seed=1)
    return dict(kind=request.param, tmp=tmp, cfg=cfg, ckpt=ckpt, module=module, batch=batch, rollout=rollout,
                want=_logps(module.model, batch, rollout))


@torch.no_grad()
def _logps(model, batch, rollout) -> torch.Tensor:
    model.eval()
    view = SequenceView.of(model, rollout, batch)
    feats = encode_media(model, batch.pixel_values, batch.grid_thw)
    hidden = completion_hidden(model, view, feats, rollout.completion_ids.shape[1])
    return completion_logps(model, hidden, rollout.completion_ids, rollout.completion_mask)[0]  # [N, T]


@pytest.mark.slow
def test_export_reloads_with_from_pretrained_and_gives_the_same_logps(trained):
    from transformers import Qwen2_5_VLForConditionalGeneration

    out = main(["--config", str(trained["cfg"]), "--ckpt", str(trained["ckpt"]), "--out",
                str(trained["tmp"] / "hf")])
    assert not (out / "adapter_config.json").exists()
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, attn_implementation="eager")
    use_reference_positions(hf.model)  # plain transformers 5 places text after a video otherwise (ktr.model.rope)
    got = _logps(hf, trained["batch"], trained["rollout"])
    if trained["kind"] == "full":
        assert torch.equal(got, trained["want"])
    else:  # W + scale * B @ A in one matrix: the same function up to float rounding
        torch.testing.assert_close(got, trained["want"], atol=1e-5, rtol=0)
    # and ktr loads it as a policy, tokenizer and patch settings included
    policy = load_policy(PolicyConfig(name_or_path=str(out), attn_implementation="eager"))
    torch.testing.assert_close(_logps(policy.model, trained["batch"], trained["rollout"]), got, atol=0, rtol=0)
    assert policy.tokenizer("<|im_start|>user")["input_ids"] == trained["module"].processor.tokenizer(
        "<|im_start|>user")["input_ids"]


@pytest.mark.slow
def test_processor_settings_are_exported(trained):
    out = export([trained["cfg"]], trained["ckpt"], trained["tmp"] / "hf_proc")
    img = json.loads((out / "preprocessor_config.json").read_text())
    vid = json.loads((out / "video_preprocessor_config.json").read_text())
    assert (img["patch_size"], img["temporal_patch_size"], img["merge_size"]) == (14, 2, 2)
    assert (img["min_pixels"], img["max_pixels"]) == (3136, 6272)  # from the config's data.image
    assert (vid["min_pixels"], vid["max_pixels"], vid["max_frames"]) == (3136, 3136, 4)
    assert img["image_mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    # Hugging Face's image processor reads the same settings (its video processor needs torchvision, which
    # ktr does not depend on, so AutoProcessor is not loaded here)
    from transformers import AutoImageProcessor

    hf = AutoImageProcessor.from_pretrained(out)
    assert (hf.patch_size, hf.merge_size, hf.size.shortest_edge, hf.size.longest_edge) == (14, 2, 3136, 6272)
    assert (out / "chat_template.jinja").exists() or "chat_template" in json.loads(
        (out / "tokenizer_config.json").read_text())


@pytest.mark.slow
def test_adapter_only_export_reloads_exactly(trained):
    if trained["kind"] != "lora":
        with pytest.raises(ValueError, match="adapter-only needs a LoRA"):
            export([trained["cfg"]], trained["ckpt"], trained["tmp"] / "adapter", adapter_only=True)
        return
    out = export([trained["cfg"]], trained["ckpt"], trained["tmp"] / "adapter", adapter_only=True)
    assert (out / "adapter_config.json").exists()
    policy = load_policy(PolicyConfig(attn_implementation="eager", adapter_path=str(out)))  # tiny base + adapter
    assert torch.equal(_logps(policy.model, trained["batch"], trained["rollout"]), trained["want"])


def test_distributed_checkpoint_directory_exports_like_the_file(trained, tmp_path):
    """`ModelParallelStrategy` writes a directory (torch.distributed.checkpoint) plus `meta.pt`: read whole, it holds
    the file's weights; read into the policy in place (`trained_policy`, what export and explain use), it gives
    the policy the file gives, cast to the config's dtype, and a directory whose weights do not fit is refused."""
    import dataclasses

    import torch.distributed.checkpoint as dcp

    from ktr.model.trained import read_configs, settings_from_config, trained_policy

    weights = checkpoint_weights(trained["ckpt"])
    full = trained["tmp"] / "dcp_full"  # FSDP2 saves every weight, the frozen base of a LoRA run included
    if not full.exists():
        dcp.save({"state_dict": weights}, checkpoint_id=str(full))
        torch.save({"global_step": 1}, full / "meta.pt")
    loaded = checkpoint_weights(full)
    assert loaded.keys() == weights.keys() and all(torch.equal(loaded[k], weights[k]) for k in weights)

    cfg = settings_from_config(read_configs([trained["cfg"]]))[0]
    want = trained_policy(cfg, trained["ckpt"]).model.state_dict()
    got = trained_policy(cfg, full).model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert any(not torch.equal(want[k], v) for k, v in load_policy(dataclasses.replace(
        cfg, gradient_checkpointing=False)).model.state_dict().items())  # the trained weights, not the init's
    half = trained_policy(dataclasses.replace(cfg, dtype="bfloat16"), full).model.state_dict()
    assert torch.bfloat16 in {v.dtype for v in half.values()}  # (peft keeps LoRA adapters in float32)
    assert all(torch.equal(half[k], want[k].to(half[k].dtype)) for k in want)

    key = next(k for k in weights if k.startswith("model.") and (trained["kind"] == "full" or "lora_" in k))
    short = tmp_path / "short"
    dcp.save({"state_dict": {k: v for k, v in weights.items() if k != key}}, checkpoint_id=str(short))
    error = ValueError if trained["kind"] == "lora" else CheckpointError
    with pytest.raises(error, match="lacks adapter weights" if trained["kind"] == "lora" else "1 missing"):
        trained_policy(cfg, short)


def test_bad_checkpoint_paths_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint_weights(tmp_path / "nope.ckpt")
    torch.save({"weights": {}}, tmp_path / "x.ckpt")
    with pytest.raises(ValueError, match="not a Lightning checkpoint"):
        checkpoint_weights(tmp_path / "x.ckpt")


def test_the_exported_run_really_trained(trained):
    """Otherwise the round trips above would only show that the untrained tiny model reloads."""
    start = load_policy(PolicyConfig(attn_implementation="eager")).model
    diff = (_logps(start, trained["batch"], trained["rollout"]) - trained["want"]).abs().max()
    assert diff > 1e-4


@pytest.mark.slow
def test_dtype_casts_the_written_weights(trained):
    """`--dtype bfloat16`: the released checkpoints' 16-bit weights from fp32 master weights, after the merge: each
    tensor is the fp32 export's, rounded."""
    from safetensors.torch import load_file

    full = export([trained["cfg"]], trained["ckpt"], trained["tmp"] / "hf_fp32")
    half = main(["--config", str(trained["cfg"]), "--ckpt", str(trained["ckpt"]), "--out",
                 str(trained["tmp"] / "hf_bf16"), "--dtype", "bfloat16"])
    a, b = (load_file(next(d.glob("*.safetensors"))) for d in (full, half))
    assert a.keys() == b.keys() and all(t.dtype == torch.float32 for t in a.values())
    assert all(b[k].dtype == torch.bfloat16 and torch.equal(b[k], a[k].to(torch.bfloat16)) for k in a)
    assert json.loads((half / "config.json").read_text()).get("dtype", "bfloat16") == "bfloat16"

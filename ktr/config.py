"""Configuration dataclasses read by several layers (layer L0: stdlib only).

Each option group is a dataclass whose attribute docstrings become `--help` text. Validation that needs only
the values themselves happens in `__post_init__`, so a bad value fails where the config is built (parse time
for the CLI), naming the key.
"""

from __future__ import annotations

import functools
import math
import types
from dataclasses import dataclass, field, fields
from typing import Literal, Union, get_args, get_origin, get_type_hints

DEFAULT_CHUNK_SIZE = 512
"""Tokens per chunk of the output projection (`loss.chunk_size`): rows of `[chunk, vocab]` logits at a time."""


# --- fixed choices: each stated once, as the Literal that annotates its field(s) ------------------------------
# The `__post_init__`s check every Literal-typed field against its values (`check_choices`); jsonargparse checks
# the same Literals at parse time. The ones that must name a registry's keys are compared with it in
# tests/test_config_choices.py.
RolloutBackendName = Literal["shared", "hf", "vllm"]
"""Registered rollout backends (`ktr.rollout.base.ROLLOUT_BACKENDS`)."""
EvalBackendName = Literal["hf", "vllm"]
"""Backends evaluation can generate with."""
SampleDraw = Literal["multinomial", "inverse_cdf"]
"""How the shared backend draws a token from the processed distribution (`ktr.rollout.sampling.choose_tokens`)."""
EvalDraw = Literal["multinomial"]
"""How evaluation's backends draw: their own samplers (`generate`'s, vLLM's)."""
DType = Literal["float32", "bfloat16", "float16"]
VLLMDType = Literal["auto", DType]
VLLMMedia = Literal["embeds", "frames"]
VLLMSleep = Literal["level1", "level2", "never"]
"""vLLM's sleep levels (`LLM.sleep`): 1 = weights to CPU, KV cache dropped; 2 = both dropped; `never`
(not `off`: YAML reads that as false)."""
VLLMMemory = Literal["derived", "fraction"]
KLTokens = Literal["key", "valid"]
Aggregation = Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"]
"""`ktr.losses.AGGREGATIONS`."""
LossNormalize = Literal["rank", "global"]
"""`ktr.training.update.LossTerms.across_ranks`."""
AdvantageName = Literal["grpo", "drgrpo"]
"""`ktr.advantages.ADVANTAGES`."""
RolloutCorrection = Literal["none", "tis"]
LengthReading = Literal["generated", "key"]
OptimizerName = Literal["adamw", "adamw_8bit", "paged_adamw_8bit"]
Schedule = Literal["constant", "cosine"]
NoDecay = Literal["bias_norm", "none"]
RopeAfterMedia = Literal["reference", "transformers"]
HeadLogits = Literal["float32", "compute"]
ScoreName = Literal["logp_diff", "kl", "js", "l1", "l2", "cosine", "hellinger"]
"""`ktr.probes.scores.SCORE_FUNCTIONS`."""
VisualPerturbation = Literal["attention_mask", "attention_mask_block", "zero_embeddings", "random_half",
                             "swap_media", "identity"]
"""`ktr.probes.visual.VISUAL_PERTURBATIONS`."""
HiddenTokens = Literal["drop", "mask"]
"""What the visual probe does with the tokens it hides: remove them from the rows, or mask them (released)."""
TemporalPerturbation = Literal["shuffle", "reverse", "segment_shuffle", "patch_shuffle", "identity"]
"""`ktr.probes.temporal.TEMPORAL_PERTURBATIONS`."""
Scope = Literal["group", "sequence", "batch"]
"""`ktr.probes.select.SCOPES`."""
Combine = Literal["union", "intersection"]
"""`ktr.probes.select.COMBINERS`."""
Weighting = Literal["hard", "softmax", "sigmoid", "linear", "exponential"]
"""`hard`, then `ktr.probes.weighting.WEIGHTINGS`."""
WeightCombine = Literal["mean", "max"]
SoftNorm = Literal["weights", "valid"]
ShardDType = Literal["bfloat16", "float32"]
AttnImplementation = Literal["eager", "sdpa", "flash_attention_2"]
VideoWrapper = Literal["replace", "keep"]
Quantization = Literal["none", "nf4"]

SCORES = get_args(ScoreName)  # = ktr.probes.scores.SCORE_FUNCTIONS


@dataclass
class VLLMSettings:
    """The colocated vLLM engine of `backend: vllm` (`ktr.rollout.vllm`; `pip install 'ktr[vllm]'`)."""

    media: VLLMMedia = "embeds"
    """`embeds`: the policy's own vision tower encodes each prompt's media once and the engine receives the
    features (what the scoring passes see, exactly); `frames`: the engine encodes the processed frames with its
    own copy of the vision tower (images only: on videos vLLM 0.32's tower disagrees with the policy's)."""
    sleep: VLLMSleep = "level1"
    """After each rollout the engine sleeps (`LLM.sleep(level)`), so that scoring, backward and the optimizer step
    have its memory; the weight sync wakes the weights, the next rollout the KV cache. `level1` = weights offloaded
    to CPU memory, KV cache dropped (the safe one for VLMs: level 2 corrupted VLM rollouts in another framework);
    `level2` = both dropped (less CPU memory; ktr reloads the weights after waking); `never` = never sleep (the
    engine stays resident, as before). CUDA only: vLLM's CPU engine has no sleep mode, there the engine's
    scheduler is paused instead (level 0) and one log line says so."""
    memory: VLLMMemory = "derived"
    """How big the engine is. `derived`: from what a step needs: KV cache for max_num_seqs sequences of
    max_model_len tokens (`kv_cache_memory_bytes`), the budget checked at start = weights + that KV cache +
    headroom_gib (`gpu_memory_utilization` computed from it); `fraction`: `gpu_memory_utilization` of the GPU
    (CPU engine: kv_cache_gib), the KV cache whatever is left of it after the weights (the old behaviour)."""
    max_num_seqs: int | None = None
    """Sequences the engine runs at once; null = group_size x prompts of the batch that builds the engine (a
    rank's rollout, all at once)."""
    max_num_batched_tokens: int | None = None
    """Tokens per engine step; null = max(max_num_seqs, max_prompt_length): any prompt is prefilled in one step
    and every sequence decodes in one."""
    headroom_gib: float = 2.0
    """`memory: derived`: GiB beyond weights and KV cache in the start-up budget (activations of a
    max_num_batched_tokens step, CUDA graphs, the CUDA context)."""
    gpu_memory_utilization: float = 0.3
    """`memory: fraction`: fraction of GPU memory the engine may take (weights + KV cache)."""
    kv_cache_gib: float = 1.0
    """`memory: fraction`: KV cache of the CPU engine in GiB (`VLLM_CPU_KVCACHE_SPACE`); ignored on GPU."""
    max_model_len: int | None = None
    """Longest sequence the engine accepts; null = the sampling's max_prompt_length + max_new_tokens."""
    enforce_eager: bool = False
    """No CUDA graphs (slower decoding, faster start, less memory)."""
    dtype: VLLMDType = "auto"
    """Engine weights and compute; `auto` = the policy's parameter dtype (under FSDP2 with fp32 master weights set
    `bfloat16`, the sharding's compute dtype)."""
    seed: int = 0
    """Seed of the engine's sampler (each request also gets a seed drawn from torch's global generator)."""

    def __post_init__(self) -> None:
        check_choices(self, "sampling.vllm")
        check_number("sampling.vllm.gpu_memory_utilization", self.gpu_memory_utilization, low=0, high=1,
                     low_open=True)
        check_number("sampling.vllm.kv_cache_gib", self.kv_cache_gib, low=0, low_open=True)
        check_number("sampling.vllm.max_num_seqs", self.max_num_seqs, integer=True, low=1, optional=True)
        check_number("sampling.vllm.max_num_batched_tokens", self.max_num_batched_tokens, integer=True, low=1,
                     optional=True)
        check_number("sampling.vllm.headroom_gib", self.headroom_gib, low=0)
        check_number("sampling.vllm.max_model_len", self.max_model_len, integer=True, low=1, optional=True)
        check_flag("sampling.vllm.enforce_eager", self.enforce_eager)
        check_number("sampling.vllm.seed", self.seed, integer=True, low=0)


@dataclass
class SamplingConfig:
    """How completions are sampled (defaults: the released run)."""

    group_size: int = 8
    """Completions per prompt (G); training needs G >= 2 (advantages are relative to the group, so one
    completion per prompt makes every advantage 0: `KTRModule` refuses it)."""
    temperature: float = 1.0
    """Sampling temperature; 0 means greedy decoding."""
    top_p: float = 0.95
    """Nucleus sampling mass."""
    top_k: int = 0
    """Top-k filter (0 = off)."""
    max_new_tokens: int = 768
    """Longest completion."""
    max_prompt_length: int = 16384
    """Longest prompt (tokens incl. vision placeholders); a longer one is skipped and counted at loading
    (`data/skipped/PromptTooLong`), never truncated."""
    backend: RolloutBackendName = "shared"
    """Rollout backend (registry `ktr.rollout.base.ROLLOUT_BACKENDS`): `shared` = each prompt prefilled once, its
    key/value cache repeated to the G rows, sampled by ktr's loop with `generate`'s logits processing (the same
    per-step distribution; with a fixed seed the same tokens); `hf` = transformers `generate` with
    `num_return_sequences`, which prefills every prompt G times (the released code's rollout); `vllm` = a
    colocated vLLM engine per rank whose weights are synced after every optimizer step (`ktr.rollout.vllm`;
    `pip install 'ktr[vllm]'`), which also returns the sampled tokens' log-probs (`train/rollout/logp_diff`,
    `loss.rollout_correction`)."""
    vllm: VLLMSettings = field(default_factory=VLLMSettings)
    """Engine settings of `backend: vllm` (ignored by the other backends)."""
    compile_decode: bool = False
    """`backend: shared` on CUDA: run each decode step through `torch.compile` over a static key/value cache
    (fixed shapes; the first rollout pays the compilation). Ignored, with a warning, on CPU, where the eager step
    over the preallocated cache is used (`ktr.rollout.shared`; docs/bench_rollout.md)."""
    draw: SampleDraw = "multinomial"
    """`backend: shared`: how a token is drawn from the processed distribution. `multinomial` = `generate`'s draw
    (`torch.multinomial`; with one seed the same tokens as `backend: hf`); `inverse_cdf` = one uniform number per
    row placed on the row's cumulative weights: the same distribution, other tokens for a seed, and on CPU far
    cheaper (`torch.multinomial` draws a random variate per vocabulary entry: the laptop demo takes 248 s with it,
    129 s without; docs/bench_draw.md). The other backends draw their own way and refuse `inverse_cdf`."""

    def __post_init__(self) -> None:
        _check_sampling(self, "sampling")


@dataclass
class DecodingConfig(SamplingConfig):
    """Sampling settings at evaluation: the rollout's fields with the released evaluation's defaults
    (docs/method.md section 6.1), plus how many questions go into one `generate` call."""

    group_size: int = 1
    """Answers per question (evaluation scores one answer: must be 1)."""
    temperature: float = 0.1
    """Sampling temperature; 0 means greedy decoding."""
    top_p: float = 0.001
    """Nucleus sampling mass (0.001 keeps almost only the most likely token)."""
    max_new_tokens: int = 1024
    """Longest answer."""
    max_prompt_length: int = 32768
    """Prompts longer than this (tokens incl. video placeholders) are skipped and listed, never truncated."""
    backend: EvalBackendName = "hf"  # type: ignore[assignment]
    """Evaluation generates with transformers' `generate` (`hf`) or a vLLM engine (`vllm`, `ktr.rollout.vllm`;
    during `fit` it shares the training module's engine when that is vLLM too)."""
    batch_size: int = 8
    """Questions per `generate` call on each rank."""
    draw: EvalDraw = "multinomial"  # type: ignore[assignment]
    """Evaluation's backends (`hf`, `vllm`) draw with their own samplers: `multinomial` only."""

    def __post_init__(self) -> None:
        _check_sampling(self, "decoding")  # (`backend` against EvalBackendName, this class's annotation)
        if self.group_size != 1:
            raise ConfigError(f"decoding.group_size must be 1 at evaluation, got {self.group_size}")
        check_number("decoding.batch_size", self.batch_size, integer=True, low=1)


@dataclass
class LossConfig:
    """The policy objective (docs/method.md section 3)."""

    beta: float = 0.04
    """KL coefficient (k3 estimator against the frozen reference); 0 drops the reference entirely."""
    kl_on: KLTokens = "key"
    """Tokens carrying the KL term: key tokens only (released) or every valid token."""
    aggregation: Aggregation = "seq-mean-token-mean"
    """Loss aggregation: released GRPO, DAPO token mean, or Dr. GRPO."""
    normalize: LossNormalize = "rank"
    """Denominators of the aggregation under several processes. `rank` (released, as its DeepSpeed run): each rank
    divides by its own completion and token counts and the gradients are averaged over ranks. `global`: the counts
    are summed over ranks first, so the loss is one mean over every rank's batch (docs/method.md section 3.3). The
    two agree for `seq-mean-token-mean` with as many completions on every rank (the released layout); they differ
    for `token-mean` and `seq-mean-token-sum-norm`, and when ranks hold different numbers of completions."""
    advantage: AdvantageName = "grpo"
    """Group advantage: (r - mean) / (std + eps), or r - mean (Dr. GRPO)."""
    clip_low: float = 0.2
    """PPO clip range below 1 (only active with several updates per rollout)."""
    clip_high: float = 0.2
    """PPO clip range above 1."""
    chunk_size: int | None = DEFAULT_CHUNK_SIZE
    """Tokens per chunk of the output projection; null materialises full logits (naive; for comparison)."""
    micro_batch_size: int | None = None
    """Completions per gradient pass; null = all N at once. The loss is normalised over the whole group."""
    shared_prefix: bool = True
    """Scoring passes run each group's prompt once, its G completions packed after it (`ktr.model.prefix`); false runs
    the N rows whole, as released (the same log-probs up to rounding, G times the prompt work)."""
    rollout_correction: RolloutCorrection = "none"
    """Rollout/training mismatch: `tis` multiplies each token's policy-gradient term by the detached truncated
    importance weight min(exp(logp_policy - logp_rollout), tis_cap) (needs a backend that returns the sampled
    tokens' log-probs: `sampling.backend: vllm`); `none` trusts the rollout to be the policy's (hf, shared)."""
    tis_cap: float = 2.0
    """Cap of the truncated importance weight (`rollout_correction: tis`)."""

    def __post_init__(self) -> None:
        check_choices(self, "loss")
        check_number("loss.beta", self.beta, low=0)
        check_flag("loss.shared_prefix", self.shared_prefix)
        check_number("loss.clip_low", self.clip_low, low=0, high=1, high_open=True)  # ratio floor 1 - clip_low > 0
        check_number("loss.clip_high", self.clip_high, low=0)
        check_number("loss.chunk_size", self.chunk_size, integer=True, low=1, optional=True)
        check_number("loss.micro_batch_size", self.micro_batch_size, integer=True, low=1, optional=True)
        check_number("loss.tis_cap", self.tis_cap, low=0, low_open=True)


@dataclass
class RewardConfig:
    """Rewards summed into the scalar that advantages are computed from (docs/method.md section 4)."""

    names: list[str] = field(default_factory=lambda: ["accuracy", "format"])
    """Registered reward names or dotted paths `pkg.module:function` of your own rewards."""
    weights: list[float] | None = None
    """One weight per reward (default 1 each)."""
    length_bonus: bool = False
    """Add the released length bonus (+0.2 for correct completions of 320-512 tokens in a group with >1 correct)."""
    length_reading: LengthReading = "key"
    """Length counted over generated tokens, or over key tokens as the released code did."""

    def __post_init__(self) -> None:
        if not isinstance(self.names, (list, tuple)) or not self.names or not all(
                isinstance(n, str) and n for n in self.names):
            raise ConfigError(f"rewards.names must be a non-empty list of reward names, got {self.names!r:.80}")
        if len(set(self.names)) != len(self.names):
            raise ConfigError(f"rewards.names repeat: {list(self.names)}")
        if self.weights is not None:
            if not isinstance(self.weights, (list, tuple)) or len(self.weights) != len(self.names):
                raise ConfigError(f"rewards.weights must be a list of {len(self.names)} numbers (one per name in "
                                  f"rewards.names) or null, got {self.weights!r:.80}")
            for i, w in enumerate(self.weights):
                check_number(f"rewards.weights[{i}]", w)
        check_flag("rewards.length_bonus", self.length_bonus)
        check_choices(self, "rewards")


@dataclass
class OptimConfig:
    """Optimiser and schedule (defaults: the released run)."""

    lr: float = 2e-6
    """Peak learning rate."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    no_decay: NoDecay = "bias_norm"
    """Parameters exempt from weight decay: `bias_norm`, biases and normalisation weights, by the rule of Hugging
    Face's `Trainer` (transformers >= 4.49), whose optimiser the released run used (`ktr.training.optim.
    decay_groups`); `none`, every trainable parameter decays (ktr before 2026-12-06: resume its checkpoints with
    `none`, whose optimiser state has one group)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    optimizer: OptimizerName = "adamw"
    """8-bit and paged variants need bitsandbytes (`pip install 'ktr[quant]'`)."""
    schedule: Schedule = "cosine"
    """Learning-rate schedule over the run's optimizer steps."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    grad_clip: float | None = 5.0
    """Clip the global gradient norm to this value (null: no clipping)."""

    def __post_init__(self) -> None:
        check_choices(self, "optim")
        check_number("optim.lr", self.lr, low=0, low_open=True)
        check_number("optim.weight_decay", self.weight_decay, low=0)
        if not isinstance(self.betas, (list, tuple)) or len(self.betas) != 2:
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {self.betas!r:.80}")
        for i, b in enumerate(self.betas):
            check_number(f"optim.betas[{i}]", b, low=0, high=1, high_open=True)
        check_number("optim.warmup_steps", self.warmup_steps, integer=True, low=0)
        check_number("optim.grad_clip", self.grad_clip, low=0, low_open=True, optional=True)


SIGNALS = ("visual", "temporal", "entropy")  # the SignalConfig fields of KeyTokenConfig
RANDOM_VISUAL = ("random_half", "swap_media")  # perturbations whose draws differ (`SignalConfig.draws`)
RANDOM_TEMPORAL = ("shuffle", "segment_shuffle", "patch_shuffle")


@dataclass
class SignalConfig:
    """One attribution signal."""

    enabled: bool = True
    """Use this signal."""
    ratio: float = 0.2
    """Fraction of valid tokens per pool this signal selects (the top (1 - ratio) quantile and above)."""
    score: ScoreName = "logp_diff"
    """How the probe compares the policy with and without the perturbation (`ktr.probes.scores`): the signed
    log-prob difference of the sampled token (released), or a distance between the full next-token
    distributions (KL(P || Q) with P the unperturbed policy, Jensen-Shannon, L1, L2, cosine, Hellinger). The
    entropy signal has no perturbation: it takes `logp_diff` only."""
    draws: int = 1
    """Counterfactual draws averaged per token (released: 1). Only for a random perturbation (temporal
    `shuffle`, `segment_shuffle`, `patch_shuffle`; visual `random_half`, and `swap_media`, whose draw d shows
    each prompt the clip d + 1 places on among the prompts of its shape). Each draw costs one decoder pass (the
    temporal probe: also one vision call). The score is then the mean over draws: an estimate of the expected
    change under the perturbation rather than the change under one sample of it."""

    def __post_init__(self) -> None:
        check_choices(self, "key_tokens.<signal>")  # KeyTokenConfig checks again, naming the signal


@dataclass
class KeyTokenConfig:
    """Which tokens receive gradient. `enabled: false` is vanilla GRPO (every valid token)."""

    enabled: bool = True
    """Video-KTR key-token masking; false gives vanilla GRPO with the same module."""
    visual: SignalConfig = field(default_factory=SignalConfig)
    """Visual-aware signal (counterfactual: media hidden)."""
    temporal: SignalConfig = field(default_factory=SignalConfig)
    """Temporal-aware signal (frames perturbed); video samples only."""
    entropy: SignalConfig = field(default_factory=SignalConfig)
    """Entropy of the policy's next-token distribution."""
    visual_perturbation: VisualPerturbation = "attention_mask"
    """How the media is hidden for the visual probe (released: attention_mask)."""
    visual_hidden: HiddenTokens = "drop"
    """`drop` (default): the hidden tokens are removed from the rows (their text neighbours keep the re-indexed
    positions), the clean counterfactual on every family, equal to masking on attention-only decoders to rounding
    (docs/method.md); `mask`: the released pass literally (attention mask 0, naive layout), which on a decoder with
    a recurrent state (Qwen3.5) still lets the masked tokens decay the state (docs/qwen35.md)."""
    temporal_perturbation: TemporalPerturbation = "shuffle"
    """How frames are perturbed for the temporal probe (released: shuffle)."""
    scope: Scope = "group"
    """Pool of the quantile: the G completions of a prompt (released), each sequence, or the whole batch."""
    combine: Combine = "union"
    """How per-signal masks combine (released: union)."""
    weighting: Weighting = "hard"
    """`hard` (released): the 0/1 key-token mask. Otherwise per-token float weights from each signal's score
    rank within the pool (`ktr.probes.weighting`), combined over signals by `weight_combine`; every valid token
    then carries gradient with its weight."""
    weight_combine: WeightCombine = "mean"
    """How soft weights of several signals combine per token (the authors' early code: mean, or max)."""
    soft_k: float = 20.0
    """Steepness of the `sigmoid` weights and inverse temperature of the `softmax` weights."""
    soft_gamma: float = 1.5
    """Spread of the `sigmoid`, `linear` and `exponential` weights: they span [1 - gamma/2, 1 + gamma/2]."""
    soft_norm: SoftNorm = "weights"
    """Normaliser of a soft-weighted loss: the sum of the weights (a 0/1 weight is then exactly the mask), or
    the number of valid tokens (the authors' early soft code multiplied the per-token loss by the weight and kept
    the valid-token denominators)."""
    random: bool = False
    """Control, not the method: run the probes and selection as configured, then replace the mask by as many
    tokens per group chosen uniformly at random among the valid ones (`random_same_count`), so the key fraction
    matches Video-KTR's step by step. Drawn from the global RNG: reproducible under `seed_everything`."""
    tie_contexts: bool = True
    """Tokens of one context (same prompt, same completion tokens before them, and for `logp_diff` scores the same
    token) share one score, the first such row's, before selection (`ktr.probes.select.tie_equal_contexts`): the
    exact ties of the released one-row-per-completion layout, in every layout, so the mask does not depend on
    rounding. false: each row's own score, ties only where the layout happens to make them bit-identical.
    A per-row random perturbation (`random_half`) has no such ties and is left as it is."""

    def __post_init__(self) -> None:
        check_choices(self, "key_tokens")
        check_flag("key_tokens.enabled", self.enabled)
        check_flag("key_tokens.tie_contexts", self.tie_contexts)
        for s in SIGNALS:
            if not isinstance(getattr(self, s), SignalConfig):
                raise ConfigError(f"key_tokens.{s} must be a mapping with `enabled` and `ratio`")
            check_choices(getattr(self, s), f"key_tokens.{s}")
        if self.enabled and not any(getattr(self, s).enabled for s in SIGNALS):
            raise ConfigError("key_tokens.enabled is true but every signal is disabled; enable one or set "
                             "key_tokens.enabled: false for vanilla GRPO")
        if self.random and not self.enabled:
            raise ConfigError("key_tokens.random matches the count Video-KTR selects, so it needs "
                             "key_tokens.enabled: true")
        if self.random and self.weighting != "hard":
            raise ConfigError("key_tokens.random replaces a hard mask; it needs key_tokens.weighting: hard")
        for s in SIGNALS:
            check_flag(f"key_tokens.{s}.enabled", getattr(self, s).enabled)
            check_number(f"key_tokens.{s}.ratio", getattr(self, s).ratio, low=0, high=1)
        for s, drawn in (("visual", RANDOM_VISUAL), ("temporal", RANDOM_TEMPORAL), ("entropy", ())):
            draws = getattr(self, s).draws
            check_number(f"key_tokens.{s}.draws", draws, integer=True, low=1)
            perturbation = getattr(self, f"{s}_perturbation", None)
            if draws > 1 and perturbation not in drawn:
                what = (f"the {perturbation!r} perturbation is deterministic" if perturbation
                        else "it has no perturbation")
                hint = f"use draws: 1, or a perturbation among {list(drawn)}" if drawn else "use draws: 1"
                raise ConfigError(f"key_tokens.{s}.draws is {draws}, but {what}: every draw would be the same; {hint}")
        if self.entropy.score != "logp_diff":
            raise ConfigError("key_tokens.entropy.score must be logp_diff: the entropy signal compares no two passes")
        if self.weighting != "hard" and self.soft_k <= 0:
            raise ConfigError(f"key_tokens.soft_k must be > 0, got {self.soft_k}")
        if self.weighting in ("sigmoid", "linear", "exponential") and not 0.0 <= self.soft_gamma < 2.0:
            raise ConfigError(f"key_tokens.soft_gamma must be in [0, 2) (weights stay positive), got {self.soft_gamma}")

    @property
    def needs_base_hidden(self) -> bool:
        """Whether an enabled probe compares full distributions (then `attribute` needs the policy's hidden states)."""
        return self.enabled and any(getattr(self, s).enabled and getattr(self, s).score != "logp_diff"
                                    for s in ("visual", "temporal"))


@dataclass
class BaselineConfig:
    """Settings of the paper's same-data baselines, used with `algorithm: t_grpo | tw_grpo` (`ktr.baselines`)."""

    shuffled_group_size: int | None = None
    """T-GRPO: completions sampled per video prompt on shuffled frames; null = G // 2 (Video-R1)."""
    temporal_bonus: float = 0.3
    """T-GRPO: added to the accuracy reward of correct ordered completions when the rule holds (Video-R1: 0.3)."""
    temporal_ratio: float = 0.8
    """T-GRPO: the bonus applies when mean ordered accuracy >= this x mean shuffled accuracy (Video-R1: 0.8)."""
    correct_threshold: float = 0.1
    """T-GRPO: a completion is correct when its accuracy exceeds this (Video-R1: 0.1)."""
    tw_alpha: float = 1.7
    """TW-GRPO: largest token weight; weights span [1, tw_alpha]."""

    def __post_init__(self) -> None:
        check_choices(self, "baseline")
        if self.shuffled_group_size is not None and self.shuffled_group_size < 1:
            raise ConfigError(f"baseline.shuffled_group_size must be >= 1 or null, got {self.shuffled_group_size}")
        if self.tw_alpha < 1.0:
            raise ConfigError(f"baseline.tw_alpha must be >= 1, got {self.tw_alpha}")


@dataclass
class ShardingConfig:
    """FSDP2 settings, used only under `ModelParallelStrategy` (ignored on one device)."""

    param_dtype: ShardDType = "bfloat16"
    """Dtype of the all-gathered weights and of the computation (master weights stay in the load dtype)."""
    reduce_dtype: ShardDType = "float32"
    """Dtype of the gradient reduce-scatter."""
    reshard_after_forward: bool = True
    """Free gathered weights after each unit's forward (ZeRO-3); false keeps them until backward (ZeRO-2)."""
    gather_for_rollout: bool = True
    """Keep weights gathered for the whole of `generate` instead of re-gathering every layer for every token."""

    def __post_init__(self) -> None:
        check_choices(self, "policy.sharding")


@dataclass
class TinyModelConfig:
    """Shape of the built-in random-init models (`tiny`, `tiny-qwen3vl`: real tokenizer and vocabulary, tiny trunk)."""

    hidden_size: int = 64
    """Width of the language model."""
    num_layers: int = 2
    """Decoder layers of the language model."""
    num_heads: int = 4
    """Attention heads (head dim = hidden_size / num_heads; must be divisible by 4 for 3D rotary sections)."""
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention)."""
    intermediate_size: int = 128
    """MLP width of the language model."""
    vision_depth: int = 2
    """Blocks of the vision tower."""
    vision_hidden_size: int = 32
    """Width of the vision tower."""
    vision_heads: int = 2
    """Attention heads of the vision tower."""
    tie_word_embeddings: bool = True
    """Share input embedding and output projection (halves the tiny model's size)."""
    seed: int = 0
    """Seed of the random initialisation (independent of the global seed)."""

    def __post_init__(self) -> None:
        check_choices(self, "policy.tiny")
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "vision_depth",
                     "vision_hidden_size", "vision_heads"):
            check_number(f"policy.tiny.{name}", getattr(self, name), integer=True, low=1)
        check_number("policy.tiny.seed", self.seed, integer=True, low=0)
        for width, heads in (("hidden_size", "num_heads"), ("vision_hidden_size", "vision_heads")):
            if getattr(self, width) % getattr(self, heads):
                raise ConfigError(f"policy.tiny.{width} ({getattr(self, width)}) must be divisible by "
                                  f"policy.tiny.{heads} ({getattr(self, heads)})")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"policy.tiny.num_heads ({self.num_heads}) must be divisible by "
                              f"policy.tiny.num_kv_heads ({self.num_kv_heads})")


@dataclass
class LoraSettings:
    """LoRA adapters on the language model's linear layers (vision tower untouched unless targeted)."""

    r: int = 64
    """Adapter rank."""
    alpha: int = 128
    """Scaling numerator (scale = alpha / r)."""
    dropout: float = 0.0
    """Dropout on the adapter input. Must be 0 with `key_tokens.enabled`: the probes compare separate passes of the
    policy, and dropout would draw a different mask in each (GRPO without key tokens may use it)."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    """Module name suffixes to adapt; matched inside the language model only."""

    def __post_init__(self) -> None:
        check_choices(self, "policy.lora")
        check_number("policy.lora.r", self.r, integer=True, low=1)
        check_number("policy.lora.alpha", self.alpha, low=0, low_open=True)
        check_number("policy.lora.dropout", self.dropout, low=0, high=1, high_open=True)


@dataclass
class PolicyConfig:
    """Which model to train and how to load it."""

    name_or_path: str = "tiny"
    """`tiny` (built-in random Qwen2.5-VL), `tiny-qwen3vl` (built-in random Qwen3-VL), a local checkpoint
    directory, or a hub id (needs network)."""
    dtype: DType = "float32"
    """Parameter dtype at load time (mixed precision is the Trainer's `precision`)."""
    attn_implementation: AttnImplementation = "sdpa"
    """Attention kernel of the language model and vision tower."""
    trust_remote_code: bool = False
    """Allow code shipped with a checkpoint to run. Off by default: only turn on for checkpoints you trust."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when loading by hub id."""
    video_wrapper: VideoWrapper = "replace"
    """Qwen3-VL (timestamped videos) only: `replace` lays the per-frame `<t seconds><|vision_start|>...
    <|vision_end|>` blocks in place of the template's `<|vision_start|><|video_pad|><|vision_end|>` (the Qwen3-VL
    reference processor and transformers 4.57, i.e. the format the released models were trained on); `keep`
    leaves that outer pair around the blocks, as transformers 5.10-5.24's `Qwen3VLProcessor` did (5.25 went back to
    `replace`; docs/qwen3vl.md)."""
    rope_after_media: RopeAfterMedia = "reference"
    """Qwen2-VL / Qwen2.5-VL only: where text resumes after a video in the 3D rotary positions. `reference`: one
    past the video's largest position, as Qwen's reference code, transformers 4.x (the released run and the
    Video-R1 SFT checkpoint) and vLLM place it; `transformers`: transformers >= 5.3's `start + max(h, w)`, which
    leaves out the video's temporal extent (ktr before 2026-12-06; `ktr.model.rope`). Images: the same either way."""
    head_logits: HeadLogits = "float32"
    """How ktr's log-prob and score passes (policy, reference, probes, loss) round the output projection's logits
    when it computes in bf16 / fp16 (mixed precision, a bf16 model, QLoRA): `float32` rounds the bf16 product to
    float32 only (on CUDA the same bf16 GEMM with a float32 output, `ktr.ops.mm_float32`);
    `compute` rounds it to bf16 first, as transformers' `lm_head` and the released code do (a logit of 20 to a
    multiple of 1/8), which is noise in the probes' log-prob differences and so in the selection (docs/fidelity.md,
    "Logit precision"). A float32 projection is the same either way. Sampling is unaffected."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    """Shape of the `tiny` model (ignored for real checkpoints)."""
    gradient_checkpointing: bool = False
    """Recompute decoder activations in backward to save memory."""
    freeze_vision: bool = False
    """Keep the vision tower frozen (the released run trains it)."""
    lora: LoraSettings | None = None
    """Train LoRA adapters instead of the full model; the reference is the base with adapters disabled."""
    adapter_path: str | None = None
    """A saved LoRA adapter directory (peft format) to load on top of the base model (e.g. for `ktr test`)."""
    quantization: Quantization = "none"
    """`nf4`: language-model linear layers in 4-bit NF4 with double quantisation, computing in `dtype` (QLoRA;
    needs `lora` to train, and bitsandbytes: `pip install 'ktr[quant]'`). Vision tower and output projection stay
    in `dtype`."""
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    """FSDP2 settings, used only when the Trainer's strategy is ModelParallelStrategy."""

    def __post_init__(self) -> None:
        check_choices(self, "policy")


# --- validation helpers (used by the `__post_init__`s above; raise `ConfigError` naming the key) -----------
class ConfigError(ValueError):
    """A setting is out of range or of the wrong type; the message starts with the key as the user writes it
    (`sampling.top_p`, `optim.betas`, `video.min_frames`). The CLI prints it without a traceback."""


def check_number(key: str, value, *, integer: bool = False, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, optional: bool = False) -> None:
    """Raise `ConfigError` unless `value` is a finite number (an int when `integer`) in the given range.

    `low`/`high` are inclusive bounds unless `low_open`/`high_open`; `optional` also accepts None.

    >>> check_number("sampling.top_p", 1.5, low=0, high=1, low_open=True)
    Traceback (most recent call last):
    ...
    ktr.config.ConfigError: sampling.top_p must be in (0, 1], got 1.5
    """
    if value is None and optional:
        return
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        want = "an integer" if integer else "a number"
        raise ConfigError(f"{key} must be {want}{' or null' if optional else ''}, got {value!r:.80}")
    if isinstance(value, float) and not math.isfinite(value):  # (ints are finite; isfinite overflows on huge ones)
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        raise ConfigError(f"{key} must be {_range(low, high, low_open, high_open)}, got {value!r}")


def _range(low, high, low_open: bool, high_open: bool) -> str:
    if high is None:
        return f"{'>' if low_open else '>='} {low:g}"
    if low is None:
        return f"{'<' if high_open else '<='} {high:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def check_choice(key: str, value, choices) -> None:
    """Raise `ConfigError` unless `value` is one of `choices`: a `Literal` alias (its values) or a tuple.

    >>> check_choice("key_tokens.scope", "groups", Scope)
    Traceback (most recent call last):
    ...
    ktr.config.ConfigError: key_tokens.scope must be one of 'group', 'sequence', 'batch', got 'groups'
    """
    if get_origin(choices) is Literal:
        choices = get_args(choices)
    if value is None and None in choices:
        return
    if not isinstance(value, (str, bool)) or value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(map(repr, choices))}, got {value!r:.80}")


def check_choices(cfg, prefix: str) -> None:
    """`check_choice` on every field of the dataclass `cfg` annotated with a Literal (or an optional one, which
    also takes None), key `prefix.<field>`: the values are read from the annotation, never retyped. Every
    dataclass above calls it from `__post_init__`, so a bad value fails where the config is built, CLI or not."""
    for name, choices in choice_fields(type(cfg)).items():
        check_choice(f"{prefix}.{name}", getattr(cfg, name), choices)


@functools.cache
def choice_fields(cls: type) -> dict[str, tuple]:
    """`{field: values}` of the dataclass `cls`'s Literal-typed fields (None among the values when optional)."""
    hints = get_type_hints(cls)  # the annotations are strings here (`from __future__ import annotations`)
    out = {}
    for f in fields(cls):
        tp = hints[f.name]
        parts = get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,)
        literals = [p for p in parts if get_origin(p) is Literal]
        if literals and all(get_origin(p) is Literal or p is type(None) for p in parts):  # not `Literal | int`
            out[f.name] = tuple(v for p in literals for v in get_args(p)) + ((None,) if type(None) in parts else ())
    return out


def check_flag(key: str, value) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r:.80}")


def check_rollout_settings(policy: PolicyConfig, sampling: SamplingConfig, loss: LossConfig) -> None:
    """Settings that only clash in combination (the RL module calls this at construction)."""
    if sampling.group_size < 2:
        # Generation alone (validation, `ktr explain`, benchmarks) legitimately samples one completion, so
        # SamplingConfig accepts 1; only the RL module, whose every advantage would then be 0, refuses it.
        raise ConfigError(f"sampling.group_size must be >= 2 for RL training, got {sampling.group_size}: "
                          f"loss.advantage {loss.advantage!r} is relative to the group's mean reward, so with one "
                          "completion per prompt every advantage is 0 and no step changes the policy (the "
                          "released runs use 8; evaluation reads decoding.group_size, not this one)")
    if sampling.backend == "vllm" and policy.quantization == "nf4":
        raise ConfigError("sampling.backend: vllm cannot serve a 4-bit (policy.quantization: nf4) policy; QLoRA "
                          "keeps the HF path: use sampling.backend: shared or hf")
    if loss.rollout_correction == "tis" and sampling.backend != "vllm":
        raise ConfigError(f"loss.rollout_correction: tis needs the rollout's own log-probs, which only "
                          f"sampling.backend: vllm returns (got backend {sampling.backend!r}); use "
                          "loss.rollout_correction: none")


def _check_sampling(cfg: SamplingConfig, key: str) -> None:
    check_number(f"{key}.group_size", cfg.group_size, integer=True, low=1)
    check_number(f"{key}.temperature", cfg.temperature, low=0)
    check_number(f"{key}.top_p", cfg.top_p, low=0, high=1, low_open=True)
    check_number(f"{key}.top_k", cfg.top_k, integer=True, low=0)
    check_number(f"{key}.max_new_tokens", cfg.max_new_tokens, integer=True, low=1)
    check_number(f"{key}.max_prompt_length", cfg.max_prompt_length, integer=True, low=1)
    check_choices(cfg, key)
    if cfg.draw != "multinomial" and cfg.backend != "shared":
        raise ConfigError(f"{key}.draw: {cfg.draw!r} is drawn by the shared backend's own loop; backend "
                          f"{cfg.backend!r} samples its own way (set {key}.draw: multinomial, or backend: shared)")

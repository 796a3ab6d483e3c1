"""One typed configuration for a pretraining run, filled from Megatron-named flags and/or a YAML
file (flags win), and one validator whose errors name the flag and the fix.

Each dataclass field is a flag: `lr_warmup_iters` is `--lr-warmup-iters` (the parser is generated
in megapre/cli/flags.py). The resolved config is a plain dict (`to_dict`) that is saved with every
checkpoint and can be fed back with `--config`. `validate` checks a config and returns a `RunPlan`
(the config with layout-dependent defaults filled in, plus the layout) without changing it.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from megapre.data.args import DataArgs
from megapre.data.fim import check_tokenizer_type
from megapre.data.tokenizers import TokenizerConfig
from megapre.flag_fields import flag, flag_field as _f
from megapre.model.config import ConfigError, TransformerConfig, legacy_swiglu_ffn_hidden_size
from megapre.parallel import layout

from . import rerun
from .distill_args import DistillArgs, check_distill_layout

# --attention-backend values (Megatron's, plus megapre's sdpa) -> TransformerConfig's backend.
ATTENTION_BACKENDS = ("auto", "flash", "fused", "unfused", "local", "sdpa")
MODEL_ATTENTION = {"auto": "auto", "flash": "sdpa-flash", "fused": "sdpa-efficient",
                   "unfused": "fused", "local": "fused", "sdpa": "sdpa"}
CONFIG_VERSION = 2  # 2: Megatron's --attention-backend values and --group-query-attention


@dataclass
class ModelArgs:
    model: str = _f("gpt", "model family", choices=("gpt", "bert"))
    num_layers: int = _f(12, "transformer layers")
    hidden_size: int = _f(768, "hidden size")
    num_attention_heads: int = _f(12, "attention heads")
    group_query_attention: bool = _f(False, "grouped-query attention with --num-query-groups "
                                     "key/value heads (as in Megatron, --num-query-groups alone "
                                     "does not switch it on)")
    num_query_groups: int | None = _f(None, "key/value heads under --group-query-attention")
    ffn_hidden_size: int | None = _f(None, "MLP hidden size (default 4*hidden; with --swiglu "
                                     "Megatron's int(4*hidden*2/3 / 64)*64)")
    kv_channels: int | None = _f(None, "per-head dim (default hidden / heads)")
    seq_length: int = _f(1024, "tokens per sample")
    max_position_embeddings: int | None = _f(None, "learned position table size (default: --seq-length)")
    normalization: str = _f("LayerNorm", "norm layer", choices=("LayerNorm", "RMSNorm"))
    norm_epsilon: float = _f(1e-5, "epsilon of the norm layers")
    apply_layernorm_1p: bool = _f(False, "norm weights stored zero-centred (gamma - 1), so weight "
                                  "decay pulls gamma towards 1 (Megatron's flag; LayerNorm and "
                                  "RMSNorm)")
    swiglu: bool = _f(False, "SwiGLU MLP instead of GELU")
    squared_relu: bool = _f(False, "ReLU^2 MLP instead of GELU (Megatron's --squared-relu)")
    erf_gelu: bool = _f(False, "exact (erf) GELU in the MLP instead of the tanh approximation, as "
                        "transformers' hidden_act 'gelu' (BERT); no fused bias-GELU kernel")
    post_layernorm: bool = _f(False, "post-LN blocks as the original BERT: norm after each "
                              "residual add, a norm after the embeddings, no final norm "
                              "(Megatron's --apply-residual-connection-post-layernorm is another "
                              "ordering)")
    share_layers_every: int = _f(1, "ALBERT cross-layer sharing: layers [jK, (j+1)K) reuse one "
                                 "set of block weights (K divides --num-layers and every "
                                 "pipeline stage's layer count; 1 = no sharing, --num-layers = "
                                 "all layers share one set)")
    embedding_size: int | None = _f(None, "ALBERT's factorized embedding: word / position / "
                                    "token-type tables of this width (< --hidden-size), "
                                    "projected up to hidden; a tied output layer projects "
                                    "down first (default: hidden, no projection)")
    qk_layernorm: bool = _f(False, "norm (--normalization) over each head's channels of queries "
                            "and keys before RoPE")
    position_embedding_type: str = _f("learned_absolute", "position encoding",
                                      choices=("learned_absolute", "rope", "none"))
    rotary_base: float = _f(10000.0, "RoPE base")
    rotary_percent: float = _f(1.0, "fraction of each head's dims that RoPE rotates")
    rotary_interleaved: bool = _f(False, "RoPE rotates adjacent channel pairs (2i, 2i+1) instead "
                                  "of the two halves")
    disable_bias_linear: bool = _f(False, "no biases in the linear layers")
    untie_embeddings_and_output_weights: bool = _f(False, "separate output layer (GPT only)")
    hidden_dropout: float = _f(0.1, "dropout on the residual stream")
    attention_dropout: float = _f(0.1, "dropout on attention probabilities")
    attention_backend: str = _f("auto", "core attention, Megatron's values: flash / fused "
                                "(torch SDPA, preferring its flash / memory-efficient kernel), "
                                "unfused / local (megapre's scale-mask-softmax kernel), sdpa "
                                "(SDPA's own choice), auto (SDPA, except the kernel on CPUs for "
                                "masked attention or while training with --attention-dropout > 0)",
                                choices=ATTENTION_BACKENDS)
    bias_gelu_fusion: bool = _f(True, "GELU MLP: add fc1's bias inside megapre's fused GELU kernel "
                                "(--no-bias-gelu-fusion: torch's bias add + GELU)")
    init_method_std: float = _f(0.02, "std of the normal weight init")
    make_vocab_size_divisible_by: int = _f(128, "pad the vocabulary to a multiple of this x TP")
    bert_binary_head: bool = _f(True, "BERT sentence-order head (--no-bert-binary-head to drop it)")


@dataclass
class ParallelArgs:
    tensor_model_parallel_size: int = _f(1, "TP size")
    pipeline_model_parallel_size: int = _f(1, "PP size")
    context_parallel_size: int = _f(1, "CP size: split every sequence over this many ranks "
                                    "(zig-zag chunks, ring attention; needs --attention-dropout 0)")
    num_layers_per_virtual_pipeline_stage: int | None = _f(
        None, "layers per virtual stage (selects the interleaved 1F1B schedule)")
    num_virtual_stages_per_pipeline_rank: int | None = _f(
        None, "model chunks per pipeline rank (selects interleaved 1F1B; or give "
        "--num-layers-per-virtual-pipeline-stage)")
    decoder_first_pipeline_num_layers: int | None = _f(
        None, "transformer layers on the first pipeline stage; the other stages share the rest "
        "evenly (Megatron's uneven pipeline split)")
    decoder_last_pipeline_num_layers: int | None = _f(
        None, "transformer layers on the last pipeline stage; the other stages share the rest "
        "evenly")
    account_for_embedding_in_pipeline_split: bool = _f(
        False, "the embedding counts as one layer of the even pipeline split: the first stage "
        "(its first virtual chunk) holds one transformer layer fewer")
    account_for_loss_in_pipeline_split: bool = _f(
        False, "the output layer and loss count as one layer of the even pipeline split: the "
        "last stage (its last virtual chunk) holds one transformer layer fewer")
    sequence_parallel: bool = _f(False, "shard norms/dropout over the sequence within TP")
    use_tp_pp_dp_mapping: bool = _f(False, "rank order tp, cp, pp, dp (a replica's pipeline "
                                    "stages on neighbouring ranks) instead of Megatron's default "
                                    "tp, cp, dp, pp")
    pipeline_schedule: str | None = _f(None, "pipeline schedule (default: interleaved with "
                                       "virtual stages, else 1f1b)",
                                       choices=(None, "1f1b", "gpipe", "interleaved"))
    distributed_timeout_minutes: float = _f(10.0, "process-group timeout")
    use_distributed_optimizer: bool = _f(
        False, "shard the AdamW state over data-parallel ranks (ZeRO-1): gradients "
        "reduce-scattered, updated parameters all-gathered; optimizer memory / DP")
    overlap_grad_reduce: bool = _f(
        False, "with --use-distributed-optimizer: start each bucket's reduce-scatter during "
        "backward (DDP always overlaps its all-reduce)")
    overlap_param_gather: bool = _f(
        False, "with --use-distributed-optimizer: all-gather updated parameters in the "
        "background, waited for at the next forward")
    ddp_bucket_size: int | None = _f(
        None, "elements per gradient bucket (default: DDP's 25 MB; distributed optimizer: one "
        "bucket, or max(40M, 1M x DP) with --overlap-grad-reduce)")
    num_distributed_optimizer_instances: int = _f(
        1, "with --use-distributed-optimizer: split DP x CP into this many equal groups of "
        "consecutive ranks, each holding a full copy of the sharded AdamW state; gradients "
        "reduce-scattered within a group, then all-reduced across groups (optimizer memory / "
        "(DP x CP / N))")

    def stage_split(self) -> layout.StageSplit:
        """The four uneven-split flags as the layout rules take them."""
        return layout.StageSplit(self.decoder_first_pipeline_num_layers,
                                 self.decoder_last_pipeline_num_layers,
                                 self.account_for_embedding_in_pipeline_split,
                                 self.account_for_loss_in_pipeline_split)

    def even_pipeline(self) -> None:
        """Drop the virtual stages and uneven-split flags: a job that loads a checkpoint into a
        layout of its own (evaluation, generation) splits its layers evenly."""
        self.num_layers_per_virtual_pipeline_stage = None
        self.num_virtual_stages_per_pipeline_rank = None
        self.decoder_first_pipeline_num_layers = None
        self.decoder_last_pipeline_num_layers = None
        self.account_for_embedding_in_pipeline_split = False
        self.account_for_loss_in_pipeline_split = False


@dataclass
class TrainArgs:
    micro_batch_size: int = _f(4, "samples per micro-batch per DP rank")
    global_batch_size: int | None = _f(None, "samples per optimizer step (default: micro * DP)")
    train_iters: int | None = _f(None, "optimizer steps (default 1000 unless --train-samples)")
    train_samples: int | None = _f(None, "samples to train on instead of --train-iters "
                                   "(iterations = samples / --global-batch-size)")
    step_batch_size_schedule: list[str] = _f(
        [], "global batch size by tokens consumed, TOKENS:BATCH ... from 0 (e.g. 0:16 2.4B:320 "
        "12B:1536; K/M/B/T suffixes; quoted or not); the last is the run's --global-batch-size")
    seed: int = _f(1234, "random seed")
    clip_grad: float = _f(1.0, "clip the global grad norm to this (0 = off)")
    bf16: bool = _f(False, "bf16 autocast, fp32 master weights")
    fp16: bool = _f(False, "fp16 autocast with dynamic loss scaling")
    initial_loss_scale: float = _f(2.0 ** 32, "fp16: starting loss scale (default 2^32, as "
                                   "Megatron)")
    loss_scale_window: int = _f(1000, "fp16: steps without overflow before the scale doubles")
    loss_scale: float | None = _f(None, "fp16: a fixed loss scale instead of dynamic scaling")
    min_loss_scale: float = _f(1.0, "fp16: the dynamic scale never goes below this")
    hysteresis: int = _f(2, "fp16: overflows before the first halving of the scale (refilled "
                         "when the scale grows; Megatron's default 2)")
    max_skipped_iters: int = _f(20, "stop after this many consecutive NaN/inf steps")
    rerun_mode: str = _f("disabled", "validate_results: re-run a step whose loss or grad norm is "
                         "NaN/Inf (or spiky, see below) to tell a transient fault from a faulty "
                         "device or a correct result (exit 16: resume from the saved checkpoint "
                         "elsewhere; 17: diagnosed); report_stats: run every step twice and "
                         "report how far results differ; disabled: megapre skips non-finite "
                         "steps (--max-skipped-iters)", choices=rerun.MODES)
    check_for_nan_in_loss_and_grad: bool = _f(True, "--rerun-mode: check losses and the grad "
                                              "norm for NaN/Inf")
    check_for_spiky_loss: bool = _f(False, "--rerun-mode: a loss 10x the largest of the first "
                                    "100 is checked (not fatal)")
    check_for_large_grads: bool = _f(False, "--rerun-mode: a grad norm 10x the largest of the "
                                     "first 100 is checked (not fatal)")
    error_injection_rate: int = _f(0, "--rerun-mode validate_results: fake a fault in about one "
                                   "validation in N (tests the path; 0: never)")
    error_injection_type: str = _f("transient_error", "the fault --error-injection-rate fakes",
                                   choices=rerun.INJECTION_TYPES)
    result_rejected_tracker_filename: str | None = _f(
        None, "append each rejected result to this file (Megatron's tracker format)")
    recompute_granularity: str | None = _f(None, "activation recomputation", choices=(None, "full", "selective"))
    recompute_method: str | None = _f(None, "full recompute: uniform (checkpoint groups of "
                                      "--recompute-num-layers layers) or block (only the first "
                                      "--recompute-num-layers layers of each pipeline chunk)",
                                      choices=(None, "uniform", "block"))
    recompute_num_layers: int | None = _f(None, "layers per recompute group (uniform) or "
                                          "recomputed layers per chunk (block)")
    deterministic_mode: bool = _f(False, "deterministic algorithms only "
                                  "(torch.use_deterministic_algorithms)")
    manual_gc: bool = _f(False, "disable Python's automatic garbage collector; collect every "
                         "--manual-gc-interval steps instead (avoids stragglers across ranks)")
    manual_gc_interval: int = _f(0, "--manual-gc: steps between collections (0: never between "
                                 "steps)")
    manual_gc_eval: bool = _f(True, "--manual-gc: collect before and after each evaluation")
    eval_interval: int = _f(1000, "validate every N steps")
    eval_iters: int = _f(100, "validation batches per evaluation")
    eval_global_batch_size: int | None = _f(None, "samples per validation batch (default "
                                            "--global-batch-size; Megatron's flag)")
    exit_duration_in_mins: float | None = _f(None, "save and exit after this many minutes")
    exit_interval: int | None = _f(None, "save and exit at an iteration multiple of this")
    device: str = _f("auto", "cuda, cpu or auto")


@dataclass
class OptimArgs:
    lr: float = _f(3e-4, "peak learning rate")
    min_lr: float = _f(0.0, "final learning rate of the decay")
    lr_decay_style: str = _f("linear", "schedule after warmup (default linear, as Megatron)",
                             choices=("cosine", "linear", "constant", "WSD", "inverse-square-root"))
    lr_warmup_iters: int = _f(0, "linear warmup steps")
    lr_warmup_fraction: float | None = _f(None, "warmup as a fraction of --lr-decay-iters")
    lr_decay_iters: int | None = _f(None, "steps over which the lr decays (default --train-iters)")
    lr_warmup_samples: int = _f(0, "warmup in samples (with --train-samples)")
    lr_decay_samples: int | None = _f(None, "decay in samples (with --train-samples; default "
                                      "--train-samples)")
    lr_wsd_decay_iters: int | None = _f(None, "WSD: steps of the final decay phase")
    lr_wsd_decay_style: str = _f("linear", "WSD: shape of the final decay",
                                 choices=("linear", "cosine", "exponential", "minus_sqrt"))
    decoupled_lr: float | None = _f(None, "peak lr of the word embedding and output layer (their "
                                    "own schedule of the same shape; Megatron's flag)")
    decoupled_min_lr: float | None = _f(None, "final lr of --decoupled-lr (default --min-lr)")
    weight_decay: float = _f(0.01, "AdamW weight decay (not on biases and norms)")
    apply_wd_to_qk_layernorm: bool = _f(False, "weight decay on the --qk-layernorm weights too")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_eps: float = _f(1e-8, "AdamW epsilon")


@dataclass
class CheckpointArgs:
    save: str | None = _f(None, "checkpoint directory to write")
    load: str | None = _f(None, "checkpoint directory to resume from")
    save_interval: int | None = _f(None, "save every N steps")
    keep_last: int | None = _f(None, "keep only the last K checkpoints")
    save_retain_interval: int | None = _f(None, "keep only the checkpoints at multiples of this "
                                          "iteration, and the latest (Megatron's flag)")
    async_save: bool = _f(False, "write checkpoints in the background")
    no_load_optim: bool = _f(False, "load weights only")
    no_load_rng: bool = _f(False, "do not restore RNG states")
    finetune: bool = _f(False, "load weights, reset iteration, optimizer and RNG")
    dist_ckpt_strictness: str = _f(
        "raise_all", "a checkpoint of another architecture: raise_all refuses any differing "
        "setting, missing or unused tensor; log_unexpected warns about differing settings and "
        "unused checkpoint tensors (deliberate partial load); log_all also loads with missing "
        "tensors (they keep their initialization)",
        choices=("raise_all", "log_unexpected", "log_all"))
    override_opt_param_scheduler: bool = _f(
        False, "on resume, use the lr schedule flags of this command line even where the "
        "checkpoint's differ", flag="--override-opt_param-scheduler")
    use_checkpoint_args: bool = _f(False, "take the model's architecture flags from the "
                                   "checkpoint in --load (Megatron's flag)")
    use_checkpoint_opt_param_scheduler: bool = _f(
        False, "on resume, use the lr schedule saved in the checkpoint (ignore the schedule "
        "flags)", flag="--use-checkpoint-opt_param-scheduler")


@dataclass
class LogArgs:
    log_interval: int = _f(100, "log every N steps")
    tensorboard_dir: str | None = _f(None, "TensorBoard event directory")
    metrics_path: str | None = _f(None, "JSONL metrics file (one object per logged step)")
    wandb_project: str | None = _f(None, "log to Weights & Biases when installed")
    wandb_exp_name: str | None = _f(None, "W&B run name")
    wandb_entity: str | None = _f(None, "W&B entity (team or user)")
    wandb_save_dir: str | None = _f(None, "W&B local directory")
    log_params_norm: bool = _f(False, "log the global L2 norm of the parameters")
    log_num_zeros_in_grad: bool = _f(False, "log how many gradient elements are exactly zero")


SECTIONS = {"model": ModelArgs, "parallel": ParallelArgs, "train": TrainArgs,
            "optim": OptimArgs, "data": DataArgs, "checkpoint": CheckpointArgs, "log": LogArgs,
            "distill": DistillArgs}


@dataclass
class PretrainConfig:
    model: ModelArgs = field(default_factory=ModelArgs)
    parallel: ParallelArgs = field(default_factory=ParallelArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    data: DataArgs = field(default_factory=DataArgs)
    checkpoint: CheckpointArgs = field(default_factory=CheckpointArgs)
    log: LogArgs = field(default_factory=LogArgs)
    distill: DistillArgs = field(default_factory=DistillArgs)
    # Set only in a quantized checkpoint's config (megapre.compress.QuantConfig.record()): the
    # loaders build int8 layers before reading its weights. Not a flag: training cannot set it.
    quantization: dict | None = None

    def to_dict(self) -> dict:
        d = {**dataclasses.asdict(self), "config_version": CONFIG_VERSION}
        if d["quantization"] is None:  # float runs' configs stay as they were
            del d["quantization"]
        return d

    def tokenizer_config(self) -> TokenizerConfig:
        """The tokenizer the data was preprocessed with (also saved with every checkpoint)."""
        d = self.data
        if d.tokenizer_type is None:
            raise ConfigError("--tokenizer-type is required (e.g. GPT2BPETokenizer with "
                              "--vocab-file and --merge-file, or the tokenizer the data was "
                              "preprocessed with)")
        fim = d.fim_data and self.model.model == "gpt"
        return TokenizerConfig(tokenizer_type=d.tokenizer_type, vocab_file=d.vocab_file,
                               merge_file=d.merge_file, tokenizer_model=d.tokenizer_model,
                               vocab_size=d.vocab_size,
                               added_tokens=d.fim(self.train.seed).sentinels() if fim else ())

    def transformer_config(self, vocab_size: int) -> TransformerConfig:
        """The model description for megapre.model, with the tokenizer's vocabulary size."""
        m = self.model
        return TransformerConfig(
            num_layers=m.num_layers, hidden_size=m.hidden_size,
            num_attention_heads=m.num_attention_heads,
            num_query_groups=m.num_query_groups if m.group_query_attention else None,
            ffn_hidden_size=m.ffn_hidden_size, kv_channels=m.kv_channels, vocab_size=vocab_size,
            make_vocab_size_divisible_by=m.make_vocab_size_divisible_by,
            max_position_embeddings=m.max_position_embeddings or m.seq_length,
            seq_length=m.seq_length, normalization=m.normalization,
            layernorm_epsilon=m.norm_epsilon, layernorm_zero_centered_gamma=m.apply_layernorm_1p,
            activation=activation_of(m), post_layernorm=m.post_layernorm,
            share_layers_every=m.share_layers_every, embedding_size=m.embedding_size,
            rotary_interleaved=m.rotary_interleaved, qk_layernorm=m.qk_layernorm,
            position_embedding_type=m.position_embedding_type, rotary_base=m.rotary_base,
            rotary_percent=m.rotary_percent, add_bias_linear=not m.disable_bias_linear,
            untie_embeddings_and_output_weights=m.untie_embeddings_and_output_weights,
            hidden_dropout=m.hidden_dropout, attention_dropout=m.attention_dropout,
            attention_backend=MODEL_ATTENTION[m.attention_backend], bias_activation_fusion=m.bias_gelu_fusion,
            init_method_std=m.init_method_std)


# -- config files ----------------------------------------------------------------------------

def load_config_file(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"--config {path}: file not found")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:
            raise ConfigError(f"--config {path}: reading YAML needs PyYAML (pip install pyyaml), "
                              "or give the file as JSON") from e
        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of flag names to values")
    return data


def apply_settings(cfg: PretrainConfig, data: dict, path: Path) -> None:
    """Accept sectioned ({'model': {...}}) or flat ({'num_layers': 2}) files; dashes allowed.
    A file without `config_version` (saved before version 2) keeps its old meaning: see
    `_upgrade`."""
    flat = _flatten(data, path)
    version = flat.pop("config_version", 1)
    if flat.pop("quantization", None) is not None:
        raise ConfigError(f"--config {path}: the config of a quantized checkpoint (int8 weights "
                          "run in megapre.generate / megapre.evaluate, they do not train); use "
                          "the float checkpoint's config")
    owners = {f.name: s for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    for key, value in (_upgrade(flat) if version < CONFIG_VERSION else flat).items():
        if key not in owners:
            raise ConfigError(f"--config {path}: unknown setting {key!r} (see --help for names)")
        setattr(getattr(cfg, owners[key]), key, value)


def _flatten(data: dict, path: Path) -> dict:
    flat: dict = {}
    for key, value in data.items():
        key = key.replace("-", "_")
        if key in SECTIONS and isinstance(value, dict):
            flat.update(_flatten(value, path))
        else:
            flat[key] = value
    return flat


def _upgrade(flat: dict) -> dict:
    """A version-1 config (megapre before Megatron's flag meanings): attention_backend 'fused'
    was megapre's scale-mask-softmax kernel (now 'unfused'; 'fused' is Megatron's SDPA
    memory-efficient path), num_query_groups alone switched grouped-query attention on, and
    SwiGLU's default width was 8h/3 rounded up to 256."""
    out = dict(flat)
    if out.get("attention_backend") == "fused":
        out["attention_backend"] = "unfused"
    if out.get("num_query_groups") is not None and "group_query_attention" not in out:
        out["group_query_attention"] = True
    if out.get("swiglu") and out.get("ffn_hidden_size") is None:  # the old default width
        out["ffn_hidden_size"] = legacy_swiglu_ffn_hidden_size(
            out.get("hidden_size", ModelArgs.hidden_size))
    return out


def from_dict(data: dict) -> PretrainConfig:
    """Inverse of to_dict (a config saved with a checkpoint)."""
    cfg = PretrainConfig()
    data = dict(data)
    cfg.quantization = data.pop("quantization", None)
    apply_settings(cfg, data, Path("<saved config>"))
    return cfg


# -- validation ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunPlan:
    """What `validate` derives from a config, which it leaves untouched: the resolved config
    (defaults that depend on the layout filled in, e.g. --global-batch-size = micro x DP) and the
    layout the run will use."""

    config: PretrainConfig
    dp_size: int
    virtual_pipeline: int | None  # model chunks per pipeline rank (interleaved 1F1B)
    pipeline_schedule: str | None  # None without pipeline parallelism
    num_microbatches: int  # per DP rank per step

    @property
    def global_batch_size(self) -> int:
        return self.config.train.global_batch_size


def _check_checkpoint_args(c: CheckpointArgs) -> None:
    from .checkpoint_fit import check_strictness

    check_strictness(c.dist_ckpt_strictness)  # a config file bypasses the parser's choices
    if c.override_opt_param_scheduler and c.use_checkpoint_opt_param_scheduler:
        raise ConfigError("--override-opt_param-scheduler (this command line's lr schedule) and "
                          "--use-checkpoint-opt_param-scheduler (the checkpoint's) exclude each "
                          "other; give one")
    if c.finetune and c.use_checkpoint_opt_param_scheduler:
        raise ConfigError("--use-checkpoint-opt_param-scheduler with --finetune: a finetune "
                          "starts a new lr schedule from this command line; drop one")


def check_distributed_optimizer(p: ParallelArgs, dp: int) -> None:
    """Megatron's rules for the distributed optimizer's flags (`dp`: the data-parallel size,
    which the optimizer instances must split evenly together with CP)."""
    if p.overlap_param_gather and not p.use_distributed_optimizer:
        raise ConfigError("--overlap-param-gather needs --use-distributed-optimizer")
    if p.ddp_bucket_size is not None and p.ddp_bucket_size < 1:
        raise ConfigError(f"--ddp-bucket-size must be >= 1 element, got {p.ddp_bucket_size}")
    layout.optimizer_shard_size(dp * p.context_parallel_size,
                                p.num_distributed_optimizer_instances,
                                p.use_distributed_optimizer)


def validate(cfg: PretrainConfig, world_size: int, vocab_size: int | None = None) -> RunPlan:
    """Check everything that can be checked before any process group exists (layout rules come
    from megapre.parallel.layout, model rules from TransformerConfig.validate)."""
    p, t, o, d = cfg.parallel, cfg.train, cfg.optim, cfg.data
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    layout.check_parallel_sizes(tp, pp)
    cp = p.context_parallel_size
    layout.check_context_parallel(cp, cfg.model.seq_length, cfg.model.attention_dropout)
    dp = layout.data_parallel_size(world_size, tp, pp, cp)
    check_distributed_optimizer(p, dp)
    vp = _virtual_stages(cfg)
    _check_gqa(cfg.model)
    _check_activation(cfg.model)
    _check_recompute(cfg.train)
    cfg.transformer_config(vocab_size or 1024).validate(tp, pp, vp, p.sequence_parallel,
                                                         p.stage_split())
    if p.pipeline_schedule == "interleaved" and vp is None:
        raise ConfigError(f"--pipeline-schedule interleaved needs {layout.VIRTUAL_FLAG}")
    layout.check_positive("--micro-batch-size", t.micro_batch_size)
    gbs = t.global_batch_size if t.global_batch_size is not None else t.micro_batch_size * dp
    schedule_sizes = []
    if t.step_batch_size_schedule:
        gbs, schedule_sizes = _batch_schedule(cfg, dp)
    train_iters = _train_iters(cfg, gbs)
    num_mb = layout.num_microbatches(t.micro_batch_size, gbs, dp)
    eval_gbs = _eval_batch_size(t, gbs, dp)
    schedule = layout.resolve_schedule(p.pipeline_schedule if pp > 1 else None, pp, vp)
    if schedule is not None:
        for size in sorted({gbs, eval_gbs, *schedule_sizes}):
            layout.check_schedule(schedule, pp, vp, layout.num_microbatches(
                t.micro_batch_size, size, dp))
    if t.bf16 and t.fp16:
        raise ConfigError("--bf16 and --fp16 are exclusive; pick one")
    _check_counts(cfg)
    if not 0 <= o.min_lr <= o.lr:
        raise ConfigError(f"--min-lr {o.min_lr} must be in [0, --lr {o.lr}]")
    if o.decoupled_min_lr is not None and o.decoupled_lr is None:
        raise ConfigError("--decoupled-min-lr needs --decoupled-lr")
    if o.decoupled_lr is not None and not 0 <= (o.decoupled_min_lr or 0.0) <= o.decoupled_lr:
        raise ConfigError(f"--decoupled-min-lr {o.decoupled_min_lr} must be in [0, "
                          f"--decoupled-lr {o.decoupled_lr}]")
    if o.lr_warmup_iters < 0:
        raise ConfigError("--lr-warmup-iters must be >= 0")
    if o.lr_decay_style == "WSD" and o.lr_wsd_decay_iters is None:
        raise ConfigError("--lr-decay-style WSD needs --lr-wsd-decay-iters (length of the final decay)")
    if cfg.model.model == "bert" and cfg.model.untie_embeddings_and_output_weights:
        raise ConfigError("--untie-embeddings-and-output-weights is GPT-only; BERT ties its LM head")
    _check_fim(cfg)
    check_distill_layout(cfg.distill, cp)
    if d.mock_data:
        _check_mock_data(cfg)
    elif not (d.data_path or d.train_data_path):
        raise ConfigError("no data: give --data-path (blend) or --train-data-path; "
                          "tools/preprocess_data.py makes the .bin/.idx files (or --mock-data "
                          "to try a launch line)")
    if d.data_path and d.train_data_path:
        raise ConfigError("give either --data-path (split by --split) or --train/valid/test-data-path, not both")
    c = cfg.checkpoint
    _check_checkpoint_args(c)
    if c.save_interval is not None and c.save_interval < 1:
        raise ConfigError(f"--save-interval must be >= 1, got {c.save_interval}")
    if c.save_interval is not None and c.save is None:
        raise ConfigError("--save-interval needs --save DIR")
    _at_least("save_retain_interval", c.save_retain_interval, 1)
    if c.save_retain_interval is not None and c.save is None:
        raise ConfigError("--save-retain-interval needs --save DIR")
    if c.keep_last is not None and c.keep_last < 1:
        raise ConfigError("--keep-last must be >= 1")
    resolved = copy.deepcopy(cfg)
    resolved.train.global_batch_size = gbs
    resolved.train.train_iters = train_iters
    return RunPlan(resolved, dp, vp, schedule, num_mb)


def _eval_batch_size(t: TrainArgs, gbs: int, dp: int) -> int:
    """--eval-global-batch-size (default: the training batch), split into whole micro-batches
    per DP rank as the training batch is."""
    if t.eval_global_batch_size is None:
        return gbs
    flag = "--eval-global-batch-size"
    layout.check_positive(flag, t.eval_global_batch_size)
    per_step = t.micro_batch_size * dp
    if t.eval_global_batch_size % per_step:
        raise ConfigError(f"{flag} {t.eval_global_batch_size} is not divisible by "
                          f"--micro-batch-size {t.micro_batch_size} x data-parallel size {dp} "
                          f"= {per_step}; use a multiple of {per_step}")
    return t.eval_global_batch_size


def _virtual_stages(cfg: PretrainConfig) -> int | None:
    """Model chunks per pipeline rank, from either of Megatron's two flags; either selects the
    interleaved schedule (megapre.parallel.layout.resolve_schedule)."""
    p, num_layers = cfg.parallel, cfg.model.num_layers
    pp, chunks = p.pipeline_model_parallel_size, p.num_virtual_stages_per_pipeline_rank
    split = p.stage_split()
    if chunks is None:
        return layout.virtual_stages(num_layers, p.num_layers_per_virtual_pipeline_stage, pp,
                                     split)
    if p.num_layers_per_virtual_pipeline_stage is not None:
        raise ConfigError("give --num-layers-per-virtual-pipeline-stage or "
                          "--num-virtual-stages-per-pipeline-rank, not both")
    if chunks >= 1 and split != layout.EVEN:
        return chunks  # layout.chunk_layers checks the uneven split
    if chunks < 1 or num_layers % (chunks * pp):
        raise ConfigError(f"--num-layers {num_layers} is not divisible by "
                          f"--num-virtual-stages-per-pipeline-rank {chunks} x "
                          f"--pipeline-model-parallel-size {pp}")
    return chunks


def recompute_spec(t: TrainArgs) -> str | None:
    """The model's recompute spec (megapre.model.transformer.parse_recompute) from Megatron's
    three flags."""
    if t.recompute_granularity != "full" or t.recompute_method is None:
        return t.recompute_granularity
    return f"full:{t.recompute_method}:{t.recompute_num_layers or 1}"


def _check_recompute(t: TrainArgs) -> None:
    if t.recompute_method is not None and t.recompute_granularity != "full":
        raise ConfigError(f"--recompute-method {t.recompute_method} needs "
                          "--recompute-granularity full")
    if t.recompute_num_layers is not None and t.recompute_num_layers < 1:
        raise ConfigError(f"--recompute-num-layers must be >= 1, got {t.recompute_num_layers}")
    if t.manual_gc_interval < 0:
        raise ConfigError(f"--manual-gc-interval must be >= 0, got {t.manual_gc_interval}")


def _check_fim(cfg: PretrainConfig) -> None:
    """FIM rates are probabilities (checked even without --fim-data, as a typo is a typo); FIM
    rearranges GPT text, so BERT and the mock corpus (random ids, no text) refuse it."""
    d = cfg.data
    d.fim(cfg.train.seed)
    if d.fim_data and cfg.model.model != "gpt":
        raise ConfigError(f"--fim-data is GPT-only (--model {cfg.model.model} trains on masked "
                          "sentence pairs)")
    if d.fim_data:
        check_tokenizer_type(d.tokenizer_type)
    if d.fim_data and d.mock_data:
        raise ConfigError("--fim-data with --mock-data: the mock corpus is random ids with no "
                          "text to rearrange (Megatron refuses it too); give --data-path")


def _check_mock_data(cfg: PretrainConfig) -> None:
    d = cfg.data
    if cfg.model.model != "gpt":
        raise ConfigError("--mock-data is GPT-only (BERT needs sentence-split data)")
    if d.data_path or d.train_data_path or d.valid_data_path or d.test_data_path:
        raise ConfigError("--mock-data replaces the data: drop --data-path / "
                          "--train-data-path, or drop --mock-data")


def batch_schedule(cfg: PretrainConfig):
    """The run's --step-batch-size-schedule (megapre.train.batch_schedule), or None."""
    from .batch_schedule import BatchSchedule

    words = cfg.train.step_batch_size_schedule
    return BatchSchedule.parse(" ".join(words), cfg.model.seq_length) if words else None


def _batch_schedule(cfg: PretrainConfig, dp: int) -> tuple[int, list[int]]:
    """(nominal global batch, every size of the schedule), checked against the layout. Megatron
    refuses --global-batch-size beside a schedule; megapre accepts it when it equals the last
    size (Megatron's own GPT-3 example passes both)."""
    t = cfg.train
    schedule = batch_schedule(cfg)
    schedule.check(t.micro_batch_size, dp)
    if t.global_batch_size is not None and t.global_batch_size != schedule.final:
        raise ConfigError(f"--global-batch-size {t.global_batch_size} differs from the last size of "
                          f"--step-batch-size-schedule ({schedule.final}); drop one or make them "
                          "agree")
    return schedule.final, [bs for _, bs in schedule.steps]


def activation_of(m: ModelArgs) -> str:
    """TransformerConfig's activation from the three MLP switches (at most one is set)."""
    if m.swiglu:
        return "swiglu"
    if m.squared_relu:
        return "squared_relu"
    return "gelu_erf" if m.erf_gelu else "gelu"


def _check_activation(m: ModelArgs) -> None:
    given = [f for f in ("swiglu", "squared_relu", "erf_gelu") if getattr(m, f)]
    if len(given) > 1:
        raise ConfigError(f"{' and '.join(flag(f) for f in given)} exclude each other; give one")


def _check_gqa(m: ModelArgs) -> None:
    if m.group_query_attention and m.num_query_groups is None:
        raise ConfigError("--group-query-attention needs --num-query-groups N (key/value heads)")


def _train_iters(cfg: PretrainConfig, gbs: int) -> int:
    """--train-iters, or --train-samples // global batch (Megatron's rule); exactly one."""
    t, o = cfg.train, cfg.optim
    if t.train_samples is not None and t.train_iters is not None:
        raise ConfigError("give --train-iters or --train-samples, not both")
    if t.train_samples is None:
        if o.lr_warmup_samples or o.lr_decay_samples is not None:
            raise ConfigError("--lr-warmup-samples / --lr-decay-samples go with --train-samples; "
                              "with --train-iters use --lr-warmup-iters / --lr-decay-iters")
        return 1000 if t.train_iters is None else t.train_iters
    if o.lr_warmup_iters or o.lr_decay_iters is not None:
        raise ConfigError("--lr-warmup-iters / --lr-decay-iters go with --train-iters; with "
                          "--train-samples use --lr-warmup-samples / --lr-decay-samples")
    _at_least("train_samples", t.train_samples, gbs)
    return t.train_samples // gbs


def _at_least(name: str, value: float | None, low: float, strict: bool = False) -> None:
    """`--name` must be >= low (> low when strict); None (not set) passes."""
    if value is None or (value > low if strict else value >= low):
        return
    raise ConfigError(f"{flag(name)} must be {'>' if strict else '>='} {low}, got {value}")


def _check_counts(cfg: PretrainConfig) -> None:
    """Intervals, counts and durations: a value that cannot mean anything is an error naming
    its flag (a negative --exit-duration-in-mins would stop the run after its first step)."""
    t = cfg.train
    for name, low in (("train_iters", 1), ("train_samples", 1), ("eval_interval", 1), ("eval_iters", 0),
                      ("exit_interval", 1), ("max_skipped_iters", 0), ("loss_scale_window", 1),
                      ("clip_grad", 0)):
        _at_least(name, getattr(t, name), low)
    _at_least("hysteresis", t.hysteresis, 1)
    _at_least("error_injection_rate", t.error_injection_rate, 0)
    if t.error_injection_rate and t.rerun_mode != "validate_results":
        raise ConfigError(f"--error-injection-rate {t.error_injection_rate} fakes faults for "
                          f"--rerun-mode validate_results (got --rerun-mode {t.rerun_mode}); add "
                          "it or drop the injection")
    for name in ("exit_duration_in_mins", "initial_loss_scale", "loss_scale", "min_loss_scale"):
        _at_least(name, getattr(t, name), 0, strict=True)
    _at_least("log_interval", cfg.log.log_interval, 1)
    _at_least("distributed_timeout_minutes", cfg.parallel.distributed_timeout_minutes, 0, strict=True)


def check_logging(log: LogArgs) -> None:
    """A logging sink whose package is missing fails at the start of a run, in one line, not
    after the model and data are built. (Not part of `validate`: planning a run, e.g. the memory
    estimate, needs no logging packages on the planning machine.)"""
    for given, module, what in ((log.wandb_project, "wandb", "--wandb-project"),
                                (log.tensorboard_dir, "tensorboard", "--tensorboard-dir")):
        if given and _missing(module):
            raise ConfigError(f"{what} needs the {module} package: pip install {module} "
                              f"(or drop {what})")


def _missing(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is None
    except ImportError:  # a parent package is missing, or the module fails to import
        return True


def decoupled_bounds(o: OptimArgs) -> tuple[float, float] | None:
    """(max, min) lr of the embedding and output layer under --decoupled-lr, else None."""
    if o.decoupled_lr is None:
        return None
    return o.decoupled_lr, o.min_lr if o.decoupled_min_lr is None else o.decoupled_min_lr

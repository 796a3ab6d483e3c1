"""The families of Megatron-LM flags beyond megapre's core table (megapre/cli/megatron_flags.py
merges them; each flag lives in exactly one place). Decided flag by flag from Megatron's help
text at commit d98e8a64dd:

* a no-op cannot change the numbers a run computes or what it saves in a way a user relies on
  (CUDA graphs, overlap and bucketing, NCCL knobs, checkpoint-writer speed, profiling and
  fault-tolerance hooks); `accept` keeps only the harmless values of the others;
* built in: megapre always behaves the way the switch asks;
* an alias: Megatron's other spelling of a megapre setting;
* refused: anything that changes model math, data or the schedule in a way megapre does not
  reproduce, with a reason shared by the family (keys ending in '-' are prefixes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Entry:
    """One Megatron flag: `accept(values)` says whether these values are a no-op here (None:
    always); `when(config)` whether the parsed config makes it one (None: always); a refused
    flag's `why` says what megapre lacks."""

    why: str
    accept: Callable[[list[str]], bool] | None = None
    when: Callable[[Any], bool] | None = None


def only(*ok: str) -> Callable[[list[str]], bool]:
    """Accept exactly these spellings."""
    return lambda values: all(v in ok for v in values)


def at_most_one(values: list[str]) -> bool:
    return all(v.lstrip("-").isdigit() and int(v) <= 1 for v in values)


def equals(number: float) -> Callable[[list[str]], bool]:
    """Accept any spelling of `number` (`0`, `0.0`, `1e0`)."""
    def accept(values: list[str]) -> bool:
        try:
            return all(float(v) == number for v in values)
        except ValueError:
            return False
    return accept


IMPL = "selects a Megatron implementation; megapre has one"
CUDA = "CUDA/NCCL tuning; megapre's path has no such switch"
CKPT = "checkpoint-writer tuning; megapre's checkpoints are always resharding torch_dist"
DIAG = "Megatron diagnostics"
_PROFILE = "profiling hook; use torch.profiler or nsys around megapre.pretrain"
_RESILIENCE = ("fault-tolerance hook (Megatron's NVRx/ADLR integration); megapre resumes from "
               "its checkpoints")
_LOGGER = "telemetry service megapre does not report to (see --metrics-path)"
_DATA_SPEED = "dataset-build speed-up; megapre builds the same samples either way"
_FP32_GRADS = "megapre accumulates and reduces every gradient in fp32"
_FP32_STATE = "megapre keeps fp32 master weights, gradients and Adam state"
_TOKENIZER_ASSETS = ("megapre records its tokenizer settings in the checkpoint; extra files "
                     "change nothing it loads")


def _rope_or_none(cfg: Any) -> bool:
    return cfg.model.position_embedding_type in ("rope", "none")


def _noops(reason: str, *names: str) -> dict[str, Entry]:
    return {name: Entry(reason) for name in names}


NOOPS: dict[str, Entry] = {
    "--onnx-safe": Entry("training needs no exporter workarounds: megapre-convert onnx exports "
                         "with standard ONNX ops"),
    **_noops(CUDA, "--cuda-graph-modules", "--cuda-graph-scope", "--cuda-graph-warmup-steps",
             "--external-cuda-graph", "--optimizer-cuda-graph", "--ddp-num-buckets",
             "--ddp-pad-buckets-for-high-nccl-busbw", "--create-all-gather-group",
             "--delay-wgrad-compute", "--disable-align-grad-reduce", "--no-align-grad-reduce",
             "--no-align-param-gather", "--disable-clone-scatter-output-in-embedding",
             "--no-clone-scatter-output-in-embedding", "--disable-jit-fuser",
             "--fused-residual-rmsnorm", "--no-gradient-reduce-div-fusion",
             "--disable-symmetric-registration", "--use-nccl-ub",
             "--nccl-communicator-config-path", "--high-priority-stream-groups",
             "--tp-comm-bootstrap-backend", "--tp-comm-overlap-rs-dgrad",
             "--disable-tp-comm-bulk-dgrad", "--disable-tp-comm-bulk-wgrad",
             "--disable-tp-comm-overlap-ag", "--disable-tp-comm-overlap-rs",
             "--disable-tp-comm-split-ag", "--disable-tp-comm-split-rs",
             "--no-tp-comm-bulk-dgrad", "--no-tp-comm-bulk-wgrad", "--no-tp-comm-overlap-ag",
             "--no-tp-comm-overlap-rs", "--no-tp-comm-split-ag", "--no-tp-comm-split-rs",
             "--no-overlap-p2p-communication", "--use-ring-exchange-p2p", "--use-sharp",
             "--sharp-enabled-group", "--symmetric-ar-type", "--train-sync-interval",
             "--use-transformer-engine-op-fuser", "--use-te-activation-func",
             "--flash-attention-version", "--distributed-timeout-seconds-after-init",
             "--distribute-saved-activations"),
    "--pipeline-model-parallel-comm-backend": Entry(CUDA, only("nccl")),
    "--mlp-chunks-for-training": Entry("MLP chunking along the sequence; megapre runs it whole",
                                       at_most_one),
    "--recompute-modules": Entry("which modules selective recomputation covers; recomputing "
                                 "never changes results (--recompute-granularity is honoured)"),
    "--use-flash-attn": Entry("legacy switch Megatron Core ignores (--attention-backend "
                              "chooses the kernel)"),
    "--ddp-reduce-scatter-with-fp32-accumulation": Entry(_FP32_GRADS),
    "--ddp-param-name-patterns-for-fp32-local-accumulation": Entry(_FP32_GRADS),
    **{name: Entry(_FP32_STATE, only("fp32"))
       for name in ("--main-grads-dtype", "--main-params-dtype", "--exp-avg-dtype",
                    "--exp-avg-sq-dtype")},
    **_noops(CKPT, "--async-ckpt-cpu-priority", "--async-ckpt-io-priority",
             "--ckpt-fully-parallel-load-exchange-algo",
             "--ckpt-fully-parallel-load-per-rank-objects",
             "--ckpt-fully-parallel-load-process-group",
             "--ckpt-fully-parallel-save-process-group", "--ckpt-pg-tensors-cache-create",
             "--ckpt-pg-tensors-cache-path", "--ckpt-drop-redundant-extra-state",
             "--dist-ckpt-workers", "--distrib-optim-fully-reshardable-mem-efficient",
             "--disable-ckpt-load-validate-sharding-integrity",
             "--no-ckpt-load-validate-sharding-integrity", "--dist-ckpt-save-pre-mcore-014"),
    **_noops("deprecated in Megatron, where it has no effect", "--dist-ckpt-format",
             "--use-dist-ckpt", "--disable-msc"),
    **_noops(_PROFILE, "--nvtx-ranges", "--record-memory-history", "--memory-snapshot-path",
             "--record-shapes", "--profile-ranks", "--pytorch-profiler-collect-callstack",
             "--pytorch-profiler-collect-chakra", "--pytorch-profiler-collect-shapes",
             "--use-pytorch-profiler", "--run-workload-inspector-server",
             "--no-barrier-with-level-1-timing"),
    **_noops(DIAG, "--disable-flight-recorder-dump-on-timeout",
             "--disable-flight-recorder-extra-dump-on-exec",
             "--disable-flight-recorder-include-only-active",
             "--no-flight-recorder-dump-on-timeout", "--no-flight-recorder-extra-dump-on-exec",
             "--no-flight-recorder-include-only-active", "--flight-recorder-dump-path",
             "--flight-recorder-include-stack-trace", "--flight-recorder-trace-buffer-size",
             "--disable-straggler-on-startup", "--straggler-ctrlr-port", "--log-straggler",
             "--gpu-sniff-test-interval", "--log-device-memory-used", "--log-energy",
             "--log-max-attention-logit", "--log-memory-interval",
             "--log-world-size-to-tensorboard", "--disable-log-loss-scale-to-tensorboard",
             "--no-log-loss-scale-to-tensorboard", "--tensorboard-queue-size", "--logging-level",
             "--config-logger-dir"),
    **_noops(_RESILIENCE, "--adlr-autoresume", "--adlr-autoresume-interval",
             "--calc-ft-timeouts", "--enable-ft-package", "--ft-num-warmup-iters",
             "--inprocess-active-world-size", "--inprocess-barrier-timeout",
             "--inprocess-completion-timeout", "--inprocess-empty-cuda-cache",
             "--inprocess-granularity", "--inprocess-hard-timeout",
             "--inprocess-heartbeat-interval", "--inprocess-heartbeat-timeout",
             "--inprocess-last-call-wait", "--inprocess-max-iterations",
             "--inprocess-monitor-process-interval", "--inprocess-monitor-thread-interval",
             "--inprocess-progress-watchdog-interval", "--inprocess-restart",
             "--inprocess-soft-timeout", "--inprocess-termination-grace-time"),
    **_noops(_LOGGER, "--app-tag-run-name", "--app-tag-run-version", "--one-logger-async",
             "--one-logger-project", "--one-logger-run-name", "--no-one-logger",
             "--otel-enabled", "--otel-service-name", "--otel-span-groups"),
    **_noops(_DATA_SPEED, "--num-dataset-builder-threads", "--dataloader-defer-npy-index-mmap",
             "--dataloader-fast-cache-load", "--per-dataset-sequences-path"),
    "--mid-level-dataset-surplus": Entry("megapre sizes blended datasets itself; Megatron's "
                                         "default is the only value", equals(0.005)),
    "--dataloader-type": Entry("megapre's sampler is Megatron's single-pass one",
                               only("single")),
    "--no-data-sharding": Entry("read only by Megatron's cyclic data loader"),
    "--local-rank": Entry("megapre takes the local rank from torchrun's LOCAL_RANK"),
    "--enable-experimental": Entry("megapre has no experimental mode; each experimental "
                                   "feature's own flag is refused"),
    "--no-initialization": Entry("megapre always initializes; --load then overwrites the "
                                 "weights"),
    "--exit-signal": Entry("megapre saves and stops on SIGTERM and SIGINT",
                           only("SIGTERM", "SIGINT")),
    "--no-position-embedding": Entry(
        "Megatron ignores it with rope positions and refuses it otherwise",
        when=_rope_or_none),
    "--null-tokenizer-pad-id": Entry("megapre's NullTokenizer has no pad token", only("-1")),
    "--tiktoken-num-special-tokens": Entry("read only by Megatron's TikTokenizer, which megapre "
                                           "does not have"),
    "--use-gigatoken": Entry("a faster tokenizer; pretraining reads tokenized data"),
    **_noops(_TOKENIZER_ASSETS, "--no-save-tokenizer-assets",
             "--disable-save-tokenizer-assets"),
    "--disable-use-tokenizer-model-from-checkpoint-args": Entry(
        "with --use-checkpoint-args megapre takes the checkpoint's tokenizer only when no "
        "--tokenizer-type is given"),
    "--vocab-extra-ids": Entry("T5 span-masking tokens; megapre has no T5", only("0")),
    "--cpu-offloading-num-layers": Entry("CPU activation offloading is not supported; 0 is the "
                                         "only value", only("0")),
    "--batch-invariant-backend": Entry("read only by --batch-invariant-mode, which is refused",
                                       only("te_native")),
    "--rope-type": Entry("megapre's rotary embedding is plain RoPE (no YaRN)", only("rope")),
    "--rotary-scaling-factor": Entry("unscaled rotary embeddings only", equals(1.0)),
    "--glu-linear-offset": Entry("megapre's GLU has no offset", equals(0.0)),
    "--softmax-type": Entry("megapre's attention softmax is the vanilla one", only("vanilla")),
    "--lr-warmup-init": Entry("megapre's warmup starts from 0", equals(0.0)),
    "--weight-decay-incr-style": Entry("megapre's weight decay is constant", only("constant")),
}

# Honoured by construction (checked against megapre's code).
BUILTIN: dict[str, str] = {
    "--accumulate-allreduce-grads-in-fp32": "megapre's parameters are fp32 (autocast computes in "
                                            "bf16/fp16), so gradients accumulate and reduce in "
                                            "fp32",
    "--fp32-residual-connection": "megapre's residual stream stays fp32 under autocast",
    "--openai-gelu": "megapre's GELU is the tanh approximation (OpenAI's) unless --erf-gelu",
    "--use-cpu-initialization": "megapre draws every weight from a per-parameter CPU generator, "
                                "so the initial model is the same for every parallel layout",
    "--load-main-params-from-ckpt": "megapre's parameters are the fp32 main copy: loading the "
                                    "model loads them",
    "--exit-signal-handler": "SIGTERM always makes megapre save and exit at the end of the step",
    "--exit-signal-handler-for-training": "SIGINT and SIGTERM always stop megapre cleanly",
    "--exit-signal-handler-for-dataloader": "megapre's data workers always leave stop signals to "
                                            "the training process",
}

# Sentinel value of an alias that takes the flag's value (Megatron's other spelling of a
# valued setting).
TAKES_VALUE = object()

ALIASES: dict[str, tuple[str, object, str]] = {
    "--disable-manual-gc-eval": ("train.manual_gc_eval", False,
                                 "no collection around evaluation (= --no-manual-gc-eval)"),
    "--persistent-save-interval": ("checkpoint.save_interval", TAKES_VALUE,
                                   "checkpoint interval (= --save-interval)"),
    "--encoder-seq-length": ("model.seq_length", TAKES_VALUE,
                             "sequence length (Megatron's older name of --seq-length)"),
    "--encoder-num-layers": ("model.num_layers", TAKES_VALUE,
                             "number of layers (Megatron's older name of --num-layers)"),
    "--export-kd-teacher-load": ("distill.teacher_checkpoint", TAKES_VALUE,
                                 "knowledge-distillation teacher (= --teacher-checkpoint, a "
                                 "megapre checkpoint; ModelOpt's --export-kd-cfg YAML is refused: "
                                 "use --kd-alpha, --kd-temperature, --kd-hidden-weight)"),
}


def _refused(reason: str, *names: str) -> dict[str, str]:
    return {name: reason for name in names}


_MOE = "mixture-of-experts is not supported by megapre"
_FP8 = "FP8 training is not supported by megapre (use --bf16)"
_MLA = "multi-latent attention is not supported by megapre"
_INFER = "inference serving is not part of megapre.pretrain (see megapre.generate)"
_FSDP = "FSDP is not supported by megapre (use --use-distributed-optimizer)"
_DSA = "sparse attention (DSA) is not supported"
_GTP = "GTP weight rematerialisation is not supported"
_OFFLOAD = "CPU offloading (activations or optimizer state) is not supported"
_LOCAL_CKPT = "non-persistent (local or in-memory) checkpoints are not supported"
_VISION = "vision models are not supported by megapre"
_RETRIEVAL = "ICT/REALM retrieval and biencoder models are not supported by megapre"
_T5 = "encoder-decoder (T5) models are not supported by megapre"
_HYBRID = "Mamba and hybrid models are not supported by megapre"
_TOKENIZER = "a tokenizer option megapre's tokenizers do not have"
_OPTIM = "only Megatron's adam optimizer (AdamW) is in megapre"
_ROPE = "RoPE scaling (Llama-3, YaRN, position interpolation) is not supported"
_PRECISION_OPT = "the precision-aware optimizer is not supported: " + _FP32_STATE
_VALIDATION = "separate or full validation sets are not supported (validation uses " \
              "--eval-iters batches of the valid split)"
_DEBUG_DUMPS = "Megatron's tensor dumps are not supported"

REFUSED: dict[str, str] = {
    # model math megapre does not have
    "--activation-func-clamp-value": "clamping the activation input is not supported",
    "--add-qkv-bias": "a QKV-only bias is not supported (biases follow --disable-bias-linear)",
    "--apply-residual-connection-post-layernorm": "the residual taken after the norm is not "
                                                  "supported (megapre's --post-layernorm is the "
                                                  "original BERT's post-LN block)",
    "--quick-geglu": "quick GeGLU is not supported",
    "--qk-l2-norm": "query/key L2 norm is not supported (see --qk-layernorm)",
    **_refused("QK-clip is not supported", "--qk-clip", "--qk-clip-alpha", "--qk-clip-threshold"),
    **_refused("sliding-window attention is not supported", "--window-size",
               "--window-attn-skip-freq"),
    "--no-rope-freq": "skipping RoPE on some layers is not supported",
    "--fp16-lm-cross-entropy": "megapre computes the LM cross entropy in fp32",
    "--output-logit-dtype": "megapre's logits follow autocast; their dtype cannot be chosen",
    "--disable-bf16-reduced-precision-matmul": "megapre keeps torch's default bf16 matmul "
                                               "reductions",
    "--init-method-xavier-uniform": "Xavier-uniform initialization is not supported",
    "--embedding-init-method-std": "a separate embedding init std is not supported "
                                   "(--init-method-std covers the embedding)",
    "--heterogeneous-layers-config-": "heterogeneous per-layer configs are not supported",
    "--freeze-all-layers": "freezing layers is not supported",
    "--head-lr-mult": "a separate head learning rate is not supported",
    **_refused("weight-decay schedules are not supported (use --weight-decay)",
               "--start-weight-decay", "--end-weight-decay"),
    "--no-weight-decay-cond-type": "megapre spells it --apply-wd-to-qk-layernorm",
    "--data-parallel-random-init": "per-data-parallel-rank seeds are not supported",
    "--enable-mhc-connections": "mHC residual connections are not supported",
    "--mhc-": "mHC residual connections are not supported",
    "--gdp-": "Gated DeltaProduct layers are not supported",
    "--batch-invariant-mode": "batch-invariant kernels are not supported",
    **_refused("the NVIDIA Kitchen extension is not supported", "--use-kitchen-attention",
               "--kitchen-attention-backend"),
    # rotary scaling and multimodal positions
    **_refused(_ROPE, "--use-rope-scaling", "--rope-scaling-factor",
               "--rotary-seq-len-interpolation-factor", "--no-yarn-correction-range-round-to-int"),
    "--yarn-": _ROPE,
    "--mrope-section": "multimodal RoPE is not supported",
    # families of features
    **_refused(_MLA, "--mscale", "--mscale-all-dim", "--cache-mla-latents",
               "--mla-down-proj-fusion"),
    **_refused(_MOE, "--overlap-moe-expert-parallel-comm",
               "--overlap-dispatch-backward-with-experts-wgrad",
               "--ep-overlap-early-attn-memory-release", "--save-tokens-per-expert-interval",
               "--use-grouped-gemm-for-shared-expert", "--use-fused-weighted-squared-relu",
               "--high-priority-a2a-comm-stream"),
    **_refused(_FP8, "--fp4-", "--disable-fp8-wgrad", "--no-fp8-wgrad",
               "--reuse-grad-buf-for-mxfp8-param-ag", "--num-layers-at-start-in-bf16",
               "--num-layers-at-end-in-bf16", "--te-precision-config-file",
               "--use-grouped-gemm-for-dense-mlp"),
    **_refused(_DSA, "--disable-dsa-indexer-rotate-activation",
               "--disable-dsa-indexer-scoring-relu", "--no-dsa-indexer-rotate-activation",
               "--no-dsa-indexer-scoring-relu"),
    **_refused(_FSDP, "--fsdp-", "--torch-fsdp2-no-reshard-after-forward",
               "--no-strict-fsdp-dtensor-load", "--disable-strict-fsdp-dtensor-load",
               "--enable-full-sharding-in-hsdp", "--outer-dp-sharding-strategy",
               "--suggested-communication-unit-size", "--init-model-with-meta-device",
               "--keep-fp8-transpose-cache"),
    **_refused(_GTP, "--gtp-", "--tensor-parallel-num-weight-shards",
               "--expert-tensor-parallel-num-weight-shards"),
    **_refused(_INFER, "--no-inference-", "--num-speculative-tokens",
               "--nccl-all-reduce-for-prefill", "--mlp-chunks-for-prefill",
               "--use-same-sampling-seed-across-dp-ranks"),
    "--no-rl-": "RL training is not supported by megapre",
    "--mtp-": "multi-token prediction is not supported by megapre",
    **_refused(_HYBRID, "--mamba-", "--hybrid-layer-pattern", "--hybrid-override-pattern",
               "--is-hybrid-model", "--disable-mamba-mem-eff-path"),
    **_refused("hybrid context parallelism (balanced variable-length packing) is not supported",
               "--hybrid-context-parallel", "--max-seqlen-per-dp-cp-rank"),
    "--pipeline-model-parallel-layout": "custom pipeline layouts are not supported",
    **_refused(_VISION, "--dino-", "--vision-", "--img-h", "--img-w", "--num-channels",
               "--num-classes", "--patch-dim", "--swin-backbone-type", "--classes-fraction",
               "--data-per-class-fraction", "--mask-factor", "--mask-type", "--iter-per-epoch"),
    **_refused(_RETRIEVAL, "--biencoder-", "--retriever-", "--ict-", "--indexer-",
               "--bert-embedder-type", "--bert-load", "--block-data-path", "--embedding-path",
               "--evidence-data-path", "--query-in-block-prob", "--titles-data-path",
               "--use-one-sent-docs", "--output-bert-embeddings"),
    **_refused(_T5, "--decoder-num-layers", "--decoder-seq-length",
               "--relative-attention-max-distance", "--relative-attention-num-buckets"),
    **_refused(_TOKENIZER, "--tokenizer-hf-no-include-special-tokens", "--tokenizer-hf-no-use-fast",
               "--tokenizer-metadata", "--tokenizer-sentencepiece-legacy",
               "--tokenizer-special-tokens",
               "--no-tokenizer-sentencepiece-ignore-extra-whitespaces",
               "--disable-tokenizer-sentencepiece-ignore-extra-whitespaces",
               "--trust-remote-code", "--null-tokenizer-eod-id"),
    "--allow-ambiguous-pad-tokens": "megapre's datasets have no pad-token masking to relax",
    **_refused("SFT is not part of megapre.pretrain (see megapre.finetune)", "--sft",
               "--sft-tokenizer-prompt-format", "--chat-template"),
    "--logits-": "knowledge distillation from saved teacher logits is not supported",
    **_refused(_OPTIM, "--muon-", "--lion-", "--sgd-momentum", "--no-use-layer-wise-param-layout",
               "--dump-param-to-param-group-map"),
    **_refused(_PRECISION_OPT, "--use-precision-aware-optimizer"),
    **_refused(_OFFLOAD, "--optimizer-cpu-offload", "--optimizer-offload-fraction",
               "--overlap-cpu-optimizer-d2h-h2d", "--use-torch-optimizer-for-cpu-offload",
               "--no-pin-cpu-grads", "--no-pin-cpu-params", "--fine-grained-activation-offloading",
               "--fine-grained-offloading-max-inflight-offloads", "--offload-modules",
               "--activation-offload-fraction", "--cpu-offloading-retain-pinned-cpu-buffers",
               "--delay-offload-until-cuda-graph", "--delta-offload-bytes-across-pp-ranks",
               "--min-offloaded-tensor-size"),
    # data and schedule
    **_refused(_VALIDATION, "--full-validation", "--multiple-validation-sets",
               "--validation-set-names"),
    **_refused("put the blend on --data-path (or its split flags) or in --config",
               "--data-args-path", "--per-split-data-args-path"),
    "--dataloader-inter-document-masking": "per-document attention via cu_seqlens is not "
                                           "supported (see --reset-attention-mask)",
    "--sample-rate": "subsampling the training data is not supported",
    "--iterations-to-skip": "skipping chosen iterations is not supported",
    "--phase-transition-iterations": "training phases are not supported (see "
                                     "--step-batch-size-schedule)",
    "--decrease-batch-size-if-needed": "megapre never changes the global batch size to fit the "
                                       "data-parallel size",
    "--start-eval-at-iter": "delaying evaluation is not supported",
    "--skip-train": "evaluation-only runs are not part of megapre.pretrain (see megapre.evaluate)",
    "--lr-wsd-decay-samples": "a WSD decay in samples is not supported (use --lr-wsd-decay-iters)",
    "--padded-vocab-size": "megapre pads the vocabulary by --make-vocab-size-divisible-by",
    **_refused("megapre always pads the vocabulary (set --make-vocab-size-divisible-by)",
               "--no-pad-vocab-size", "--disable-pad-vocab-size"),
    # checkpoints
    **_refused(_LOCAL_CKPT, "--non-persistent-", "--replication", "--replication-factor",
               "--replication-jump"),
    **_refused("megapre checkpoints always hold the optimizer and RNG states", "--no-save-optim",
               "--no-save-rng"),
    "--ckpt-convert-": "converting checkpoints during a run is not supported",
    "--ckpt-step": "megapre loads the checkpoint --load's tracker names",
    "--override-ckpt-iteration": "overriding the loaded iteration is not supported",
    "--exit-on-missing-checkpoint": "megapre starts from scratch (with a note) when --load holds "
                                    "no checkpoint",
    "--pretrained-checkpoint": "megapre.pretrain fine-tunes from --load with --finetune (or see "
                             "megapre.finetune)",
    "--use-mp-args-from-checkpoint-args": "megapre's --use-checkpoint-args takes the "
                                          "architecture; the parallel layout stays the command "
                                          "line's",
    **_refused("Multi-Storage Client (object-store paths) is not supported", "--enable-msc",
               "--object-storage-cache-path"),
    **_refused(_DEBUG_DUMPS, "--save-activations-interval", "--save-dgrads-interval",
               "--save-params-interval", "--save-wgrads-interval"),
    # process setup
    "--fault-injector-": "fault injection is not supported",
    "--fake-process-group": "fake process groups (no communication) are not supported",
    "--lazy-mpu-init": "external (lazy) initialization is not supported",
    "--yaml-cfg": "use --config (megapre reads Megatron's model_config.yaml)",
    # Megatron itself refuses these deprecated spellings
    "--batch-size": "no longer valid in Megatron: use --micro-batch-size",
    "--warmup": "no longer valid in Megatron: use --lr-warmup-fraction",
    "--model-parallel-size": "no longer valid in Megatron: use --tensor-model-parallel-size",
    "--checkpoint-activations": "no longer valid in Megatron: use --recompute-activations, or "
                                "--recompute-granularity and --recompute-method",
}

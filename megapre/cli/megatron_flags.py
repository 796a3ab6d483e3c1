"""Megatron-LM flags that megapre does not map onto a config field: the ones it accepts as
no-ops (they select a Megatron implementation or CUDA tuning; megapre has one implementation
of each), the ones it refuses (features it does not have), and Megatron's spellings of settings
megapre names differently. One table, so the parser, the startup note and the README agree.

A Megatron launch line therefore parses as it is: each of its flags is honoured (a config
field, see --help), listed here as a no-op (one note at startup names them), or refused with one
line naming the flag (exit 2). Anything else is an unknown flag, with a did-you-mean hint.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

from megapre.errors import ConfigError

NOOP_DEST = "megatron_noop."


@dataclass(frozen=True)
class Entry:
    """One Megatron flag: `accept(values)` says whether these values are a no-op here (None:
    always); a refused flag's `why` says what megapre lacks."""

    why: str
    accept: Callable[[list[str]], bool] | None = None


def _only(*ok: str) -> Callable[[list[str]], bool]:
    return lambda values: all(v in ok for v in values)


def _at_most_one(values: list[str]) -> bool:
    return all(v.lstrip("-").isdigit() and int(v) <= 1 for v in values)


_IMPL = "selects a Megatron implementation; megapre has one"
_CUDA = "CUDA/NCCL tuning; megapre's path has no such switch"
_CKPT = "checkpoint-writer tuning; megapre's checkpoints are always resharding torch_dist"
_DIAG = "Megatron diagnostics"

# Accepted and ignored, listed at startup. Keys are flags as Megatron spells them.
NOOPS: dict[str, Entry] = {
    "--use-mcore-models": Entry(_IMPL),
    "--use-legacy-models": Entry(_IMPL),
    "--transformer-impl": Entry(_IMPL, _only("local", "transformer_engine")),
    "--spec": Entry(_IMPL, _only("local")),
    "--distributed-backend": Entry("megapre picks nccl on GPUs and gloo on CPUs",
                                   _only("nccl", "gloo")),
    "--no-gradient-accumulation-fusion": Entry(_CUDA),
    "--no-masked-softmax-fusion": Entry(_CUDA),
    "--no-bias-dropout-fusion": Entry(_CUDA),
    "--no-bias-swiglu-fusion": Entry(_CUDA),
    "--no-persist-layer-norm": Entry(_CUDA),
    "--no-rope-fusion": Entry(_CUDA),
    "--cross-entropy-loss-fusion": Entry(_CUDA),
    "--cross-entropy-fusion-impl": Entry(_CUDA),
    "--no-create-attention-mask-in-dataloader": Entry("megapre builds masks only where needed"),
    "--no-mmap-bin-files": Entry("megapre always memory-maps .bin files"),
    "--empty-unused-memory-level": Entry(_CUDA),
    "--enable-cuda-graph": Entry(_CUDA),
    "--cuda-graph-impl": Entry(_CUDA, _only("none", "local")),
    "--tp-comm-overlap": Entry(_CUDA),
    "--tp-comm-overlap-cfg": Entry(_CUDA),
    "--defer-embedding-wgrad-compute": Entry(_CUDA),
    "--wgrad-deferral-limit": Entry(_CUDA),
    "--overlap-p2p-communication-warmup-flush": Entry(_CUDA),
    "--overlap-param-gather-with-optimizer-step": Entry(_CUDA),
    "--microbatch-group-size-per-virtual-pipeline-stage": Entry(
        "interleaved-schedule ordering; megapre's schedule gives the same result"),
    "--ddp-average-in-collective": Entry("megapre sums exact shares of the global-batch mean"),
    "--disable-gloo-process-groups": Entry(_IMPL),
    "--te-rng-tracker": Entry(_IMPL),
    "--use-persistent-ckpt-worker": Entry(_CKPT),
    "--dist-ckpt-optim-fully-reshardable": Entry(_CKPT),
    "--ckpt-fully-parallel-save": Entry(_CKPT),
    "--no-ckpt-fully-parallel-save": Entry(_CKPT),
    "--ckpt-fully-parallel-load": Entry(_CKPT),
    "--ckpt-assume-constant-structure": Entry(_CKPT),
    "--async-ckpt-use-cpu-shm": Entry(_CKPT),
    "--async-strategy": Entry(_CKPT, _only("nvrx", "mcore")),
    "--auto-detect-ckpt-format": Entry(_CKPT),
    "--verify-integrity": Entry(_CKPT),
    "--no-use-tokenizer-model-from-checkpoint-args": Entry(
        "with --use-checkpoint-args megapre takes the checkpoint's tokenizer only when no "
        "--tokenizer-type is given"),
    "--timing-log-level": Entry(_DIAG),
    "--timing-log-option": Entry(_DIAG),
    "--straggler-minmax-count": Entry(_DIAG),
    "--check-weight-hash-across-dp-replicas-interval": Entry(_DIAG),
    "--log-progress": Entry("megapre's --metrics-path records progress"),
    "--expert-model-parallel-size": Entry("no experts: a size of 1 is the only layout",
                                          _at_most_one),
    "--tiktoken-pattern": Entry("read only by Megatron's TikTokenizer, which megapre does not "
                                "have (--tokenizer-type TikTokenizer is refused)"),
    "--cp-comm-type": Entry("megapre's context parallelism is a p2p ring", _only("p2p")),
    "--grad-reduce-in-bf16": Entry("megapre reduces gradients in fp32"),
    "--ckpt-format": Entry("megapre writes torch.distributed.checkpoint (torch_dist) checkpoints",
                           _only("torch_dist", "torch")),
    "--optimizer": Entry("megapre's optimizer is Megatron's adam (AdamW)", _only("adam")),
    "--tensorboard-log-interval": Entry("megapre logs every --log-interval steps to every sink"),
    "--profile": Entry("use torch.profiler around megapre.pretrain"),
    "--profile-step-start": Entry("use torch.profiler around megapre.pretrain"),
    "--profile-step-end": Entry("use torch.profiler around megapre.pretrain"),
}

# Honoured by construction: megapre always behaves the way these switches ask.
BUILTIN: dict[str, str] = {
    "--attention-softmax-in-fp32": "megapre's attention softmax always runs in fp32",
    "--apply-query-key-layer-scaling": "it keeps fp16 scores from overflowing; megapre's fp32 "
                                       "softmax does the same",
    "--calculate-per-token-loss": "megapre's loss is always the token mean over the global batch",
    "--log-throughput": "megapre always logs tokens/s, TFLOP/s and MFU",
    "--log-validation-ppl-to-tensorboard": "validation perplexity goes to every metrics sink",
    "--log-memory-to-tensorboard": "GPU memory goes to every metrics sink",
    "--log-timers-to-tensorboard": "step time goes to every metrics sink",
}

_MOE = "mixture-of-experts is not supported by megapre"
_FP8 = "FP8 training is not supported by megapre (use --bf16)"
_MLA = "multi-latent attention is not supported by megapre"
_INFER = "inference serving is not part of megapre.pretrain (see megapre.generate)"
_RL = "RL training is not supported by megapre"
_FSDP = "FSDP is not supported by megapre (use --use-distributed-optimizer)"

# Refused with one line naming the flag (exit 2). Prefixes end with '-'.
REFUSED: dict[str, str] = {
    "--num-experts": _MOE, "--moe-": _MOE, "--expert-tensor-parallel-size": _MOE,
    "--fp8-": _FP8, "--fp8": _FP8, "--first-last-layers-bf16": _FP8, "--fp4": _FP8,
    "--multi-latent-attention": _MLA, "--q-lora-rank": _MLA, "--kv-lora-rank": _MLA,
    "--qk-head-dim": _MLA, "--qk-pos-emb-head-dim": _MLA, "--v-head-dim": _MLA,
    "--inference-": _INFER, "--incoming-requests-per-sec": _INFER,
    "--incoming-requests-per-step": _INFER, "--num-tokens-to-generate": _INFER,
    "--prompts": _INFER, "--prompt-file": _INFER, "--prompt-file-num-truncate": _INFER,
    "--output-path": _INFER, "--output-every-n-results": _INFER, "--return-log-probs": _INFER,
    "--temperature": _INFER, "--top_k": _INFER, "--top_p": _INFER, "--top-n-logprobs": _INFER,
    "--termination-id": _INFER, "--stop-words": _INFER, "--enable-chunked-prefill": _INFER,
    "--flash-decode": _INFER, "--decode-only-cuda-graphs": _INFER, "--use-coordinator": _INFER,
    "--use-legacy-static-engine": _INFER, "--max-tokens-to-oom": _INFER,
    "--use-flashinfer-fused-rope": _INFER, "--test-mode": _INFER, "--async-mode": _INFER,
    "--grpo-": _RL, "--rl-": _RL, "--langrl-env-config": _RL, "--perform-rl-step": _RL,
    "--refit-method": _RL,
    "--use-megatron-fsdp": _FSDP, "--use-torch-fsdp2": _FSDP, "--megatron-fsdp-": _FSDP,
    "--data-parallel-sharding-strategy": _FSDP,
    "--experimental-attention-variant": "experimental attention variants are not supported",
    "--dsa-": "sparse attention (DSA) is not supported",
    "--linear-": "linear-attention layers are not supported",
    "--attention-output-gate": "gated attention output is not supported",
    "--hierarchical-context-parallel-sizes": "hierarchical context parallelism is not supported",
    "--export-": "ModelOpt export/distillation is not supported",
    "--use-mup": "muP is not supported", "--mup-": "muP is not supported",
    "--account-for-embedding-in-pipeline-split": "uneven pipeline splits are not supported",
    "--account-for-loss-in-pipeline-split": "uneven pipeline splits are not supported",
    "--decoder-first-pipeline-num-layers": "uneven pipeline splits are not supported",
    "--decoder-last-pipeline-num-layers": "uneven pipeline splits are not supported",
    "--rampup-batch-size": "batch-size ramp-up is not supported (Megatron deprecated it: use "
                           "--step-batch-size-schedule)",
    "--eval-micro-batch-size": "a separate evaluation micro-batch size is not supported "
                               "(validation uses --micro-batch-size; --eval-global-batch-size "
                               "sets its batch)",
    "--num-experts-per-token": _MOE,
}

# Megatron's spelling -> (section.field, value) where megapre names the setting differently.
ALIASES: dict[str, tuple[str, object, str]] = {
    "--bert-no-binary-head": ("model.bert_binary_head", False, "BERT without the sentence-order "
                              "head (Megatron's name of --no-bert-binary-head)"),
    "--use-rotary-position-embeddings": ("model.position_embedding_type", "rope",
                                         "RoPE positions (= --position-embedding-type rope)"),
    "--recompute-activations": ("train.recompute_granularity", "selective",
                                "selective recomputation (= --recompute-granularity selective)"),
}


def add_megatron_flags(parser: argparse.ArgumentParser, taken: set[str]) -> None:
    """The no-op, refused and alias flags (those megapre's own fields do not already define).
    No-ops and refusals take any number of values, so switches and valued flags both parse."""
    aliases = parser.add_argument_group("Megatron spellings")
    for name, (dest, value, text) in ALIASES.items():
        aliases.add_argument(name, dest=dest, action="store_const", const=value,
                             default=argparse.SUPPRESS, help=text)
    builtin = parser.add_argument_group("Megatron switches megapre always honours")
    for name, text in BUILTIN.items():
        if name not in taken:
            builtin.add_argument(name, dest="megatron_builtin." + name, action="store_true",
                                 default=argparse.SUPPRESS, help=text)
    noops = parser.add_argument_group(
        "Megatron flags accepted as no-ops (implementation or CUDA tuning selectors)")
    for name, entry in NOOPS.items():
        if name not in taken:
            noops.add_argument(name, dest=NOOP_DEST + name, nargs="*", metavar="V",
                               default=argparse.SUPPRESS, help=entry.why)


def refused_reason(flag: str) -> str | None:
    """Why megapre refuses `flag` (exact name or a refused family prefix), or None."""
    if flag in REFUSED:
        return REFUSED[flag]
    for prefix, why in REFUSED.items():
        if prefix.endswith("-") and flag.startswith(prefix):
            return why
    return None


def check_refused_words(argv: list[str]) -> None:
    """Refuse the flags of features megapre lacks before argparse sees them, so the error says
    the feature is missing (not that `--moe-router-topk` is misspelt)."""
    for word in argv:
        if word.startswith("--"):
            name = word.split("=")[0]
            why = refused_reason(name)
            if why is not None:
                raise ConfigError(f"{name}: {why}")


def collect(args: argparse.Namespace) -> list[str]:
    """The no-op flags that were given; ConfigError for one given a value megapre cannot
    honour (`--transformer-impl inference_optimized`)."""
    given = []
    for key, values in sorted(vars(args).items()):
        if key.startswith(NOOP_DEST):
            name = key[len(NOOP_DEST):]
            entry = NOOPS[name]
            if entry.accept is not None and not entry.accept([str(v) for v in values]):
                shown = " ".join(str(v) for v in values)
                raise ConfigError(f"{name} {shown}: not supported by megapre ({entry.why})")
            given.append(name)
    return given


def noop_note(given: list[str]) -> str | None:
    """The startup note naming the no-op flags a run was given."""
    if not given:
        return None
    return ("accepted as no-ops (Megatron implementation/tuning selectors megapre does not "
            "need): " + ", ".join(given))


def readme_table() -> str:
    """The README's table of these flags (tests check the README carries it verbatim)."""
    rows = ["| Megatron flag | megapre |", "|---|---|"]
    rows += [f"| `{n}` | {text} |" for n, (_, _, text) in ALIASES.items()]
    rows += [f"| `{n}` | honoured: {text} |" for n, text in BUILTIN.items()]
    rows += [f"| `{n}` | no-op: {e.why} |" for n, e in NOOPS.items()]
    rows += [f"| `{n}{'*' if n.endswith('-') else ''}` | refused: {why} |"
             for n, why in REFUSED.items()]
    return "\n".join(rows)

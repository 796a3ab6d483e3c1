"""Megatron-LM flags that megapre does not map onto a config field: the ones it accepts as
no-ops (they select a Megatron implementation or CUDA tuning; megapre has one implementation
of each), the ones it refuses (features it does not have), and Megatron's spellings of settings
megapre names differently. One table, so the parser, the startup note and the README agree;
the long tail of Megatron's flags is kept by family in megatron_flag_catalog.py and merged here
(each flag in one place).

A Megatron launch line therefore parses as it is: each of its flags is honoured (a config
field, see --help), listed here as a no-op (one note at startup names them), or refused with one
line naming the flag (exit 2). A flag of Megatron's full list (megatron_flag_names.py) that no
table names gets a generic refusal; anything else is an unknown flag, with a did-you-mean hint.
"""
from __future__ import annotations

import argparse
from collections import Counter
from typing import Any

from megapre.cli import megatron_flag_catalog as catalog
from megapre.cli.megatron_flag_catalog import CKPT as _CKPT
from megapre.cli.megatron_flag_catalog import CUDA as _CUDA
from megapre.cli.megatron_flag_catalog import DIAG as _DIAG
from megapre.cli.megatron_flag_catalog import IMPL as _IMPL
from megapre.cli.megatron_flag_catalog import TAKES_VALUE, Entry
from megapre.cli.megatron_flag_catalog import at_most_one as _at_most_one
from megapre.cli.megatron_flag_catalog import only as _only
from megapre.cli.megatron_flag_names import MEGATRON_FLAGS, SOURCE_COMMIT
from megapre.errors import ConfigError

NOOP_DEST = "megatron_noop."
GENERIC = "a Megatron-LM flag megapre does not implement"

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
    "--export-": "ModelOpt export is not supported (distillation: --teacher-checkpoint)",
    "--use-mup": "muP is not supported", "--mup-": "muP is not supported",
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


def _merge(core: dict, families: dict) -> None:
    """Add the catalog's families to a core table: one place per flag, so a clash is a bug."""
    clash = core.keys() & families.keys()
    if clash:
        raise AssertionError(f"Megatron flags listed twice: {sorted(clash)}")
    core.update(families)


_merge(NOOPS, catalog.NOOPS)
_merge(BUILTIN, catalog.BUILTIN)
_merge(REFUSED, catalog.REFUSED)
_merge(ALIASES, catalog.ALIASES)


def _add_alias(group: argparse._ArgumentGroup, parser: argparse.ArgumentParser, name: str,
               dest: str, value: object, text: str) -> None:
    """A switch setting `dest` to `value`, or (TAKES_VALUE) another spelling of the flag that
    sets `dest`, parsed exactly as that flag is."""
    if value is not TAKES_VALUE:
        group.add_argument(name, dest=dest, action="store_const", const=value,
                           default=argparse.SUPPRESS, help=text)
        return
    [target] = [a for a in parser._actions if a.dest == dest]
    group.add_argument(name, dest=dest, type=target.type, nargs=target.nargs,
                       choices=target.choices, metavar=target.metavar,
                       default=argparse.SUPPRESS, help=text)


def add_megatron_flags(parser: argparse.ArgumentParser, taken: set[str]) -> None:
    """The no-op, refused and alias flags (those megapre's own fields do not already define).
    No-ops and refusals take any number of values, so switches and valued flags both parse."""
    aliases = parser.add_argument_group("Megatron spellings")
    for name, (dest, value, text) in ALIASES.items():
        _add_alias(aliases, parser, name, dest, value, text)
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
    """Why megapre refuses `flag` (exact name or a refused family prefix), or None (an alias
    is never refused, even inside a refused family)."""
    if flag in ALIASES:
        return None
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


def check_unrecognized(words: list[str]) -> None:
    """The parser's fallback for words it does not know: a Megatron flag no table lists is
    refused by name (it is Megatron's, not a typo), anything else stays argparse's error."""
    for word in words:
        name = word.split("=")[0]
        if name in MEGATRON_FLAGS:
            raise ConfigError(f"{name}: {GENERIC}")


def collect(args: argparse.Namespace, cfg: Any = None) -> list[str]:
    """The no-op flags that were given; ConfigError for one given a value megapre cannot
    honour (`--transformer-impl inference_optimized`) or one the parsed `cfg` makes
    meaningful (`--no-position-embedding` with learned positions)."""
    given = []
    for key, values in sorted(vars(args).items()):
        if key.startswith(NOOP_DEST):
            name = key[len(NOOP_DEST):]
            entry = NOOPS[name]
            if entry.accept is not None and not entry.accept([str(v) for v in values]):
                shown = " ".join(str(v) for v in values)
                raise ConfigError(f"{name} {shown}: not supported by megapre ({entry.why})")
            if entry.when is not None and cfg is not None and not entry.when(cfg):
                raise ConfigError(f"{name}: not supported by megapre ({entry.why})")
            given.append(name)
    return given


def noop_note(given: list[str]) -> str | None:
    """The startup note naming the no-op flags a run was given."""
    if not given:
        return None
    return ("accepted as no-ops (Megatron implementation/tuning selectors megapre does not "
            "need): " + ", ".join(given))


def classify(flag: str, ours: set[str]) -> str:
    """Where `flag` stands: 'alias' (alias or built in), 'noop', 'honoured' (a megapre
    field), 'refused' (a named missing feature), 'generic' (a Megatron flag no table lists)
    or 'unknown'."""
    if flag in ALIASES or flag in BUILTIN:
        return "alias"
    if flag in NOOPS:
        return "noop"
    if flag in ours:
        return "honoured"
    if refused_reason(flag) is not None:
        return "refused"
    return "generic" if flag in MEGATRON_FLAGS else "unknown"


def coverage() -> Counter:
    """How megapre answers each of Megatron's flags, by `classify` category."""
    from megapre.cli.flags import build_parser

    ours = {o for a in build_parser()._actions for o in a.option_strings}
    return Counter(classify(flag, ours) for flag in MEGATRON_FLAGS)


def coverage_line(counts: Counter | None = None) -> str:
    """The one-line summary the coverage benchmark prints and the README quotes."""
    c = coverage() if counts is None else counts
    return (f"Megatron flags ({SOURCE_COMMIT}): {c['honoured']} honoured, {c['alias']} "
            f"aliases/builtin, {c['noop']} no-ops, {c['refused']} refused by feature, "
            f"{c['generic']} refused generically")


def _grouped(rows: list[tuple[str, str]]) -> list[str]:
    """One table row per reason: the flags that share it, in table order."""
    by_reason: dict[str, list[str]] = {}
    for flag, reason in rows:
        by_reason.setdefault(reason, []).append(f"`{flag}`")
    return [f"| {', '.join(flags)} | {reason} |" for reason, flags in by_reason.items()]


def readme_table() -> str:
    """The README's table of these flags, one row per reason (tests check the README carries
    it verbatim); prefix families are starred, the generic fallback is one counted row."""
    rows = ["| Megatron flag | megapre |", "|---|---|"]
    rows += [f"| `{n}` | {text} |" for n, (_, _, text) in ALIASES.items()]
    rows += _grouped([(n, f"honoured: {text}") for n, text in BUILTIN.items()])
    rows += _grouped([(n, f"no-op: {e.why}") for n, e in NOOPS.items()])
    rows += _grouped([(n + ("*" if n.endswith("-") else ""), f"refused: {why}")
                      for n, why in REFUSED.items()])
    generic = coverage()["generic"]
    rows.append(f"| any other of Megatron's {len(MEGATRON_FLAGS)} flags ({generic} at "
                f"{SOURCE_COMMIT}) | refused: {GENERIC} |")
    return "\n".join(rows)

"""Every rule of a (TP, CP, PP, virtual PP, DP, SP) layout, in one place, with errors that name the
flags to change.

The pretraining validator, the process mesh, the pipeline cutter, the schedules, the training step
and the inference runtime all ask these functions; none keeps a copy of a rule. Uneven splits are
errors (as in Megatron-LM): they would give ranks different work or wrong attention heads. The one
exception is Megatron's own uneven pipeline split (`StageSplit`): the first / last pipeline stage
may hold a given number of layers, or count the embedding / the loss as a layer, because those
stages do extra work; `chunk_layers` is the only place that turns a split into layer counts.
"""
from __future__ import annotations

from dataclasses import dataclass

from megapre.errors import ConfigError

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b")
VIRTUAL_FLAG = "--num-layers-per-virtual-pipeline-stage"
VIRTUAL_RANK_FLAG = "--num-virtual-stages-per-pipeline-rank"
CP_FLAG = "--context-parallel-size"
FIRST_FLAG = "--decoder-first-pipeline-num-layers"
LAST_FLAG = "--decoder-last-pipeline-num-layers"
EMBEDDING_FLAG = "--account-for-embedding-in-pipeline-split"
LOSS_FLAG = "--account-for-loss-in-pipeline-split"


@dataclass(frozen=True)
class StageSplit:
    """Megatron-LM's four ways of unevening the pipeline split (its flags, same meaning): the
    first / last pipeline stage holds `first_layers` / `last_layers` transformer layers (the
    others share the rest evenly), or the embedding / the output layer and loss count as one
    layer of the even split (the first / last stage then builds one transformer layer fewer).
    The default is the even split."""

    first_layers: int | None = None
    last_layers: int | None = None
    account_for_embedding: bool = False
    account_for_loss: bool = False

    @property
    def fixed_ends(self) -> bool:
        """The first or last stage's layer count is given."""
        return self.first_layers is not None or self.last_layers is not None

    @property
    def accounts(self) -> bool:
        """The embedding or the loss counts as a layer."""
        return self.account_for_embedding or self.account_for_loss

    def flags(self) -> str:
        """The flags that set this split, for error messages."""
        words = [f"{FIRST_FLAG} {self.first_layers}" if self.first_layers is not None else "",
                 f"{LAST_FLAG} {self.last_layers}" if self.last_layers is not None else "",
                 EMBEDDING_FLAG if self.account_for_embedding else "",
                 LOSS_FLAG if self.account_for_loss else ""]
        return " ".join(w for w in words if w)


EVEN = StageSplit()


def check_positive(flag: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{flag} must be a positive integer, got {value!r}")


def check_parallel_sizes(tp: int, pp: int, virtual: int | None = None) -> None:
    """TP and PP sizes, and virtual stages (model chunks per pipeline rank) when given."""
    check_positive("--tensor-model-parallel-size", tp)
    check_positive("--pipeline-model-parallel-size", pp)
    if virtual is None:
        return
    check_positive("virtual pipeline stages per rank", virtual)
    if pp < 2:
        raise ConfigError(
            f"{virtual} virtual pipeline stages per rank ({VIRTUAL_FLAG}) need "
            f"--pipeline-model-parallel-size >= 2 (got {pp}); drop {VIRTUAL_FLAG} or use more "
            "pipeline stages")


def data_parallel_size(world_size: int, tp: int, pp: int, cp: int = 1) -> int:
    """World size / (TP x CP x PP)."""
    model_parallel = tp * pp * cp
    if world_size % model_parallel:
        sizes = f"--tensor-model-parallel-size {tp} x "
        if cp > 1:
            sizes += f"{CP_FLAG} {cp} x "
        raise ConfigError(
            f"world size {world_size} is not divisible by {sizes}"
            f"--pipeline-model-parallel-size {pp} = {model_parallel}; launch a multiple of "
            f"{model_parallel} processes (torchrun --nproc-per-node) or change the sizes")
    return world_size // model_parallel


INSTANCES_FLAG = "--num-distributed-optimizer-instances"


def optimizer_shard_size(dp_cp: int, instances: int, distributed: bool = True) -> int:
    """Ranks one distributed-optimizer instance shards its state over: DP x CP / N. Megatron's
    rules: N divides DP x CP, and N > 1 needs --use-distributed-optimizer (without it every rank
    already holds the whole state, so there is nothing to split into instances)."""
    check_positive(INSTANCES_FLAG, instances)
    if instances > 1 and not distributed:
        raise ConfigError(f"{INSTANCES_FLAG} {instances} needs --use-distributed-optimizer "
                          "(the instances are copies of its sharded state)")
    if dp_cp % instances:
        raise ConfigError(f"{INSTANCES_FLAG} {instances} must divide the data-parallel x "
                          f"context-parallel size {dp_cp}; use a divisor of {dp_cp}")
    return dp_cp // instances


def check_context_parallel(cp: int, seq_length: int, attention_dropout: float = 0.0) -> None:
    """Context parallelism cuts each sequence into 2 x CP chunks (zig-zag, so causal attention
    costs every CP rank the same), which must be equal; the ring attention draws no
    attention-dropout masks (its backward recomputes the probabilities)."""
    check_positive(CP_FLAG, cp)
    if cp == 1:
        return
    if seq_length % (2 * cp):
        raise ConfigError(f"{CP_FLAG} {cp} needs --seq-length {seq_length} divisible by 2 x {cp} "
                          f"= {2 * cp} (the zig-zag split cuts each sequence into {2 * cp} equal "
                          "chunks)")
    if attention_dropout > 0:
        raise ConfigError(f"{CP_FLAG} {cp} needs --attention-dropout 0 (got {attention_dropout}):"
                          " ring attention recomputes the probabilities in backward and draws no "
                          "dropout masks")


def virtual_stages(num_layers: int, layers_per_virtual_stage: int | None, pp: int,
                   split: StageSplit = EVEN) -> int | None:
    """Model chunks per pipeline rank from Megatron's --num-layers-per-virtual-pipeline-stage
    (the embedding / loss slots of an accounting split count as layers, as in Megatron)."""
    if layers_per_virtual_stage is None:
        return None
    if split.fixed_ends:
        raise ConfigError(f"{split.flags()} with virtual stages: give {VIRTUAL_RANK_FLAG} "
                          f"instead of {VIRTUAL_FLAG} (as Megatron-LM asks)")
    slots = num_layers + split.account_for_embedding + split.account_for_loss
    if layers_per_virtual_stage < 1 or slots % (layers_per_virtual_stage * pp):
        counted = f" + {slots - num_layers} ({split.flags()})" if split.accounts else ""
        raise ConfigError(f"--num-layers {num_layers}{counted} is not divisible by {VIRTUAL_FLAG} "
                          f"{layers_per_virtual_stage} x --pipeline-model-parallel-size {pp}")
    return slots // (layers_per_virtual_stage * pp)


def chunk_layers(num_layers: int, pp: int, virtual: int | None = None,
                 split: StageSplit = EVEN) -> list[list[int]]:
    """Transformer layers of each model chunk, `[pipeline rank][virtual chunk]`, by Megatron's
    rules: each rank's share (`_rank_shares`) is cut into `virtual` equal chunks; the
    embedding's slot comes off chunk 0 of rank 0, the loss's off the last chunk of the last rank
    (those chunks may be left with no transformer layer). ConfigError when the split is
    impossible."""
    v = virtual or 1
    shares = _rank_shares(num_layers, pp, split)
    for share in shares:
        if share % v:
            raise ConfigError(_virtual_remainder(num_layers, pp, v, split, share))
    counts = [[share // v] * v for share in shares]
    if split.account_for_embedding:
        counts[0][0] -= 1
    if split.account_for_loss:
        counts[-1][-1] -= 1
    return counts


def chunk_ranges(num_layers: int, pp: int, virtual: int | None = None,
                 split: StageSplit = EVEN) -> list[list[tuple[int, int]]]:
    """Global layer range [first, last) of each chunk, `[pipeline rank][virtual chunk]`. Layers
    run in virtual-stage order (chunk c of rank p is stage c x pp + p, Megatron's interleaving),
    so a range starts where the previous stage's ends: the indices (and checkpoint keys) of a
    layer never depend on the layout."""
    counts = chunk_layers(num_layers, pp, virtual, split)
    ranges: list[list[tuple[int, int]]] = [[] for _ in range(pp)]
    start = 0
    for chunk in range(len(counts[0])):
        for rank in range(pp):
            ranges[rank].append((start, start + counts[rank][chunk]))
            start += counts[rank][chunk]
    return ranges


def stage_layers(num_layers: int, pp: int, split: StageSplit = EVEN) -> list[int]:
    """Transformer layers each pipeline rank holds (all its virtual chunks together)."""
    return [sum(chunks) for chunks in chunk_layers(num_layers, pp, None, split)]


def _rank_shares(num_layers: int, pp: int, split: StageSplit) -> list[int]:
    """Layer slots of each pipeline rank (the embedding / loss slots included)."""
    if split.fixed_ends:
        return _fixed_end_shares(num_layers, pp, split)
    slots = num_layers + split.account_for_embedding + split.account_for_loss
    if slots % pp:
        if not split.accounts:
            raise ConfigError(f"--num-layers {num_layers} is not divisible by "
                              f"--pipeline-model-parallel-size {pp}: every pipeline stage must "
                              "hold the same number of layers")
        raise ConfigError(f"--num-layers {num_layers} + {slots - num_layers} ({split.flags()}) "
                          f"= {slots} is not divisible by --pipeline-model-parallel-size {pp}")
    return [slots // pp] * pp


def _fixed_end_shares(num_layers: int, pp: int, split: StageSplit) -> list[int]:
    """Shares when --decoder-first/last-pipeline-num-layers fix the end stages."""
    if split.accounts:
        raise ConfigError(f"{split.flags()}: give {FIRST_FLAG} / {LAST_FLAG} or {EMBEDDING_FLAG} "
                          f"/ {LOSS_FLAG}, not both (Megatron-LM refuses the mix)")
    if pp < 2:
        raise ConfigError(f"{split.flags()} needs --pipeline-model-parallel-size >= 2 (got {pp})")
    for flag, n in ((FIRST_FLAG, split.first_layers), (LAST_FLAG, split.last_layers)):
        if n is not None:
            check_positive(flag, n)
    ends = {r: n for r, n in ((0, split.first_layers), (pp - 1, split.last_layers))
            if n is not None}
    rest, others = num_layers - sum(ends.values()), pp - len(ends)
    if not others and rest:
        raise ConfigError(f"{split.flags()} must add up to --num-layers {num_layers}: "
                          f"--pipeline-model-parallel-size {pp} has no other stage to take the "
                          f"remaining {rest}")
    if others and (rest < others or rest % others):
        raise ConfigError(
            f"{split.flags()} leave {rest} of --num-layers {num_layers} for the other {others} "
            f"stages of --pipeline-model-parallel-size {pp}, which must share them evenly, at "
            "least one layer each")
    return [ends.get(r, rest // others if others else 0) for r in range(pp)]


def _virtual_remainder(num_layers: int, pp: int, v: int, split: StageSplit, share: int) -> str:
    """The message when a rank's share does not cut into `v` virtual chunks."""
    if split == EVEN:
        return (f"--num-layers {num_layers} is not divisible by --pipeline-model-parallel-size "
                f"{pp} x {v} virtual stages = {pp * v}: every pipeline chunk must hold the same "
                "number of layers")
    return (f"{split.flags()} with --num-layers {num_layers} and --pipeline-model-parallel-size "
            f"{pp} give a pipeline stage {share} layer slots, not divisible by {v} virtual "
            "stages per rank")


def check_model_split(*, num_layers: int, num_attention_heads: int, num_query_groups: int,
                      ffn_hidden_size: int, seq_length: int, tp: int, pp: int,
                      virtual: int | None = None, sequence_parallel: bool = False,
                      split: StageSplit = EVEN, share_layers_every: int = 1) -> None:
    """Can this model be cut into TP shards and PP chunks (evenly, or as `split` says)?"""
    check_parallel_sizes(tp, pp, virtual)
    if num_attention_heads % num_query_groups:
        raise ConfigError(
            f"--num-attention-heads {num_attention_heads} is not divisible by --num-query-groups "
            f"{num_query_groups}: each key/value head serves an equal group of query heads")
    if num_attention_heads % tp:
        raise ConfigError(
            f"--num-attention-heads {num_attention_heads} is not divisible by "
            f"--tensor-model-parallel-size {tp}: each TP rank must own whole heads")
    if num_query_groups % tp:
        raise ConfigError(
            f"--num-query-groups {num_query_groups} is not divisible by "
            f"--tensor-model-parallel-size {tp}: each TP rank must own whole key/value groups")
    if ffn_hidden_size % tp:
        raise ConfigError(f"--ffn-hidden-size {ffn_hidden_size} is not divisible by "
                          f"--tensor-model-parallel-size {tp}")
    chunk_layers(num_layers, pp, virtual, split)
    check_shared_layers(num_layers, share_layers_every, pp, virtual, split)
    if sequence_parallel and seq_length % tp:
        raise ConfigError(f"--sequence-parallel needs --seq-length {seq_length} divisible by "
                          f"--tensor-model-parallel-size {tp}")


def check_shared_layers(num_layers: int, every: int, pp: int = 1, virtual: int | None = None,
                        split: StageSplit = EVEN) -> None:
    """--share-layers-every K: layers [jK, (j+1)K) reuse one weight set, so K must divide the
    layer count, and every pipeline chunk must hold whole sets: a set is then never split over
    stages and its gradient needs no cross-stage sum (unlike the tied word table)."""
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise ConfigError(f"--share-layers-every={every!r} must be a positive integer")
    if num_layers % every:
        raise ConfigError(f"--share-layers-every {every} does not divide --num-layers "
                          f"{num_layers}: each weight set serves {every} consecutive layers")
    for rank, chunks in enumerate(chunk_ranges(num_layers, pp, virtual, split)):
        for first, last in chunks:
            if first % every or last % every:
                raise ConfigError(
                    f"--share-layers-every {every}: pipeline rank {rank} holds layers [{first}, "
                    f"{last}), which splits a shared set; make every stage's (virtual chunk's) "
                    f"layer count a multiple of {every}")


def num_microbatches(micro_batch_size: int, global_batch_size: int, dp: int) -> int:
    """Micro-batches per DP rank per optimizer step."""
    check_positive("--micro-batch-size", micro_batch_size)
    check_positive("--global-batch-size", global_batch_size)
    per_step = micro_batch_size * dp
    if global_batch_size % per_step:
        raise ConfigError(
            f"--global-batch-size {global_batch_size} is not divisible by --micro-batch-size "
            f"{micro_batch_size} x data-parallel size {dp} = {per_step}; use a multiple of "
            f"{per_step}")
    return global_batch_size // per_step


def resolve_schedule(name: str | None, pp: int, virtual: int | None) -> str | None:
    """The schedule to run: None without pipeline parallelism; the flag's 'interleaved' is
    interleaved-1f1b; unset picks interleaved-1f1b with virtual stages, else 1F1B."""
    if pp == 1:
        if name not in (None, "1f1b", "gpipe"):
            raise ConfigError(f"--pipeline-schedule {name} needs --pipeline-model-parallel-size > 1")
        return None
    if name is None:
        return "interleaved-1f1b" if (virtual or 1) > 1 else "1f1b"
    return "interleaved-1f1b" if name == "interleaved" else name


def check_schedule(name: str, pp: int, virtual: int | None, num_microbatches: int) -> None:
    """Refuse schedule / layout / micro-batch combinations the schedules cannot run."""
    if name not in SCHEDULES:
        raise ConfigError(f"--pipeline-schedule {name!r} is not one of 1f1b, gpipe, interleaved")
    v = virtual or 1
    if name == "interleaved-1f1b" and v < 2:
        raise ConfigError(f"--pipeline-schedule interleaved needs {VIRTUAL_FLAG} (at least 2 "
                          "model chunks per pipeline rank)")
    if name != "interleaved-1f1b" and v > 1:
        raise ConfigError(f"--pipeline-schedule {name} runs one chunk per rank; with {VIRTUAL_FLAG} "
                          f"({v} chunks per rank) use --pipeline-schedule interleaved")
    if name == "1f1b" and num_microbatches < pp:
        raise ConfigError(
            f"1F1B needs at least as many micro-batches ({num_microbatches}) as pipeline stages "
            f"({pp}); raise --global-batch-size or lower --micro-batch-size")
    if name == "interleaved-1f1b":
        rounds = max(1, num_microbatches // pp)
        if num_microbatches % rounds:
            raise ConfigError(
                f"interleaved 1F1B with {pp} pipeline stages cannot run {num_microbatches} "
                f"micro-batches; use a multiple of {pp}")

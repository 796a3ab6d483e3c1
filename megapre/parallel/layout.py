"""Every rule of a (TP, CP, PP, virtual PP, DP, SP) layout, in one place, with errors that name the
flags to change.

The pretraining validator, the process mesh, the pipeline cutter, the schedules, the training step
and the inference runtime all ask these functions; none keeps a copy of a rule. Uneven splits are
errors (as in Megatron-LM): they would give ranks different work or wrong attention heads.
"""
from __future__ import annotations

from megapre.errors import ConfigError

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b")
VIRTUAL_FLAG = "--num-layers-per-virtual-pipeline-stage"
CP_FLAG = "--context-parallel-size"


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


def virtual_stages(num_layers: int, layers_per_virtual_stage: int | None, pp: int) -> int | None:
    """Model chunks per pipeline rank from Megatron's --num-layers-per-virtual-pipeline-stage."""
    if layers_per_virtual_stage is None:
        return None
    if layers_per_virtual_stage < 1 or num_layers % (layers_per_virtual_stage * pp):
        raise ConfigError(f"--num-layers {num_layers} is not divisible by {VIRTUAL_FLAG} "
                          f"{layers_per_virtual_stage} x --pipeline-model-parallel-size {pp}")
    return num_layers // (layers_per_virtual_stage * pp)


def check_layer_split(num_layers: int, pp: int, virtual: int | None = None) -> int:
    """Layers per model chunk: every chunk must hold the same number."""
    chunks = pp * (virtual or 1)
    if num_layers % chunks:
        what = (f"--pipeline-model-parallel-size {pp} x {virtual} virtual stages = {chunks}"
                if virtual else f"--pipeline-model-parallel-size {pp}")
        raise ConfigError(f"--num-layers {num_layers} is not divisible by {what}: every pipeline "
                          "chunk must hold the same number of layers")
    return num_layers // chunks


def check_model_split(*, num_layers: int, num_attention_heads: int, num_query_groups: int,
                      ffn_hidden_size: int, seq_length: int, tp: int, pp: int,
                      virtual: int | None = None, sequence_parallel: bool = False) -> None:
    """Can this model be cut into TP shards and PP chunks evenly?"""
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
    check_layer_split(num_layers, pp, virtual)
    if sequence_parallel and seq_length % tp:
        raise ConfigError(f"--sequence-parallel needs --seq-length {seq_length} divisible by "
                          f"--tensor-model-parallel-size {tp}")


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

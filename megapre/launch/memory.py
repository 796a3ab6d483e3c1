"""Parameters, per-rank memory and FLOPs of a pretraining run, before launch.

    python tools/estimate_memory.py --model gpt --num-layers 24 --hidden-size 2048 ... \
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --world-size 8 \
        --vocab-size 50257          # or the tokenizer flags the run would use

Weights, grads and AdamW state are exact byte counts of what megapre allocates (fp32 master
weights even under --bf16/--fp16 autocast; fp32 grads; exp_avg + exp_avg_sq in fp32). Under
autocast the step additionally keeps a half-precision copy of every matrix it multiplies with
(autocast's weight cache), 2 bytes per matrix parameter. --use-distributed-optimizer shards the
AdamW state over DP: 8 * ceil(n / DP) bytes per rank (bucket padding aside). The fp32 weights are
the master copy the forward reads, so they stay whole on every rank (Megatron shards a separate
fp32 master beside bf16 weights; megapre has no such copy to shard), and the grad buffer is whole
too (the reduce-scatter reads all of it).

Activations: what autograd keeps for backward, per transformer layer and micro-batch, derived
from megapre's ops (s = seq length, b = micro-batch, h = hidden, a = heads, d = head dim,
f = ffn hidden, t = TP size; s_n = s/t under --sequence-parallel else s; e = bytes of a matmul
result: 4 in fp32, 2 under autocast; m = bytes of a dropout mask: 1 on CUDA, on CPU the dtype of
what is dropped: e for attention probs, 4 for the residual branches when the linears have a
bias (added in fp32), else e)::

    norm1 input (fp32 residual) + norm2 input (saved sum)   2 * 4 * s_n*b*h
    norm statistics (mean, rstd; RMSNorm rstd only)          2 * 4 * 2|1 * s_n*b
    qkv and fc1 inputs (normed, cast to e)                   2 * e * s*b*h
    q, k, v as the attention matmuls keep them: MHA          e * s*b*(a+2g)*d/t (qkv output)
        + RoPE's rotated q and k                             2 * e * s*b*a*d/t
        GQA: q merged, k and v expanded to all heads         3 * e * s*b*a*d/t
        RoPE cos/sin (fp32, q and k)                         16 * s*rot
    attention core (backend 'auto': fused on CPUs with a mask or attention dropout, else sdpa)
    attention core, fused backend: probs                     e * b*(a/t)*s^2
        + attention dropout (mask + dropped probs)           (m + e) * b*(a/t)*s^2
    attention core, sdpa backend: log-sum-exp only           4 * b*(a/t)*s
    context (proj input)                                     e * s*b*a*d/t
    hidden dropout masks (2, when --hidden-dropout > 0)      2 * m * s_n*b*h
    MLP: GELU keeps fc1 out + gelu out; SwiGLU gate out,     2 | 4 * e * s*b*f/t
         silu out, fc1 out, product (autocast: the normed
         input is cast once per projection)                  + e * s*b*h

Shared layers (--share-layers-every K) hold one weight set per K layers (weights, grads, AdamW
state and autocast's cache counted once per set) but keep every layer's activations. A factorized
embedding (--embedding-size E) has [*, E] tables and an E x h up-projection (its [s, b, E] input
kept); the tied GPT head adds an h x E down-projection, and the logits (BERT: its LM head's
dense, GELU and norm) are E wide.

Outside the layers: the first stage keeps the embedding dropout mask; the last stage keeps the
final norm's input and output and the cross-entropy's fp32 softmax of the logits
(4 * s*b*V/t) while the logits themselves (e * s*b*V/t) are alive; BERT's LM head adds its
dense and GELU outputs (2 * e * s*b*h) and computes the logits (and the softmax) only at the
predicted positions: s is then round(mask_prob * s) + 1 per sample, plus the gathered norm output
of those rows (e * rows*h).

Context parallelism (--context-parallel-size c): every rank holds s/c tokens of each sequence,
so every s above is s/c (activations 1/c of the CP-free run's), and attention is the ring
(megapre/parallel/context.py): it keeps its inputs as 'selective' below does (grouped-query k/v
are not expanded) and the log-sum-exp (4 * b*(a/t)*s/c); its s x s blocks exist one at a time,
in the working set.

Recomputation: 'full' keeps only each layer's input (4 * s_n*b*h) and rebuilds one layer at a
time in backward (+ one layer's activations); 'selective' drops the s^2 terms (probs, dropout)
and the expanded k/v of the attention core, keeping its inputs (the qkv output, plus rotated
q and k with RoPE or the merged q with grouped-query heads) and output.

In-flight micro-batches per rank: 1 without PP; 1F1B: min(pp - stage, micro-batches) (the first
stage holds pp); GPipe: all micro-batches; interleaved 1F1B: Megatron's warm-up count
(2 * (pp - 1) + (v - 1) * pp + 1 chunk micro-batches on the first stage).

The backward pass also needs a working set beyond what is saved (gradients of the largest
activations); it is counted as two of the largest per-micro-batch activation tensors.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

from megapre.model.attention_core import resolve_backend
from megapre.model.config import TransformerConfig
from megapre.parallel.layout import EVEN, StageSplit, stage_layers
from megapre.train.args import PretrainConfig, validate
from megapre.train.metrics import flops_per_token

GiB = 2**30


@dataclass
class StageMemory:
    """One pipeline stage's rank (the same on every TP/DP rank of it), in bytes."""

    stage: int
    params: int  # elements on this rank (TP shard, with its embeddings / output layer)
    weights: int
    grads: int
    optimizer: int
    autocast_cache: int
    activations_per_microbatch: int
    in_flight_microbatches: float
    activations: int  # without recomputation (or with the configured one, see estimate)
    activations_full_recompute: int
    activations_selective_recompute: int
    transient: int

    @property
    def model_states(self) -> int:
        return self.weights + self.grads + self.optimizer + self.autocast_cache

    def total(self, activations: int | None = None) -> int:
        return self.model_states + self.transient + (
            self.activations if activations is None else activations)


@dataclass
class MemoryEstimate:
    total_params: int
    non_embedding_params: int
    padded_vocab_size: int
    world_size: int
    tp: int
    pp: int
    dp: int
    num_microbatches: int
    recompute: str | None
    stages: list[StageMemory]
    flops_per_token: float
    flops_per_step: float
    flops_per_rank_per_step: float
    device: str = "cuda"  # the device type the estimate assumed
    attention_backend: str = "sdpa"  # the core attention it assumed on that device
    distributed_optimizer: bool = False  # AdamW state sharded over DP x CP / instances
    cp: int = 1  # context-parallel size: each rank holds 1/cp of every sequence
    optimizer_instances: int = 1  # --num-distributed-optimizer-instances

    @property
    def optimizer_shard(self) -> int:
        """Ranks the distributed optimizer shards AdamW over: DP x CP / instances."""
        return self.dp * self.cp // self.optimizer_instances

    @property
    def most_loaded(self) -> StageMemory:
        return max(self.stages, key=lambda st: st.total(self.configured_activations(st)))

    def configured_activations(self, st: StageMemory) -> int:
        return {None: st.activations, "full": st.activations_full_recompute,
                "selective": st.activations_selective_recompute}[self.recompute]

    def peak_bytes(self) -> int:
        st = self.most_loaded
        return st.total(self.configured_activations(st))


# -- parameters ------------------------------------------------------------------------------

def layer_params(cfg: TransformerConfig, tp: int = 1) -> int:
    """One transformer layer's parameters on one TP rank."""
    h, d, f = cfg.hidden_size, cfg.head_dim, cfg.ffn_hidden_size
    a, g = cfg.num_attention_heads, cfg.num_query_groups
    norm = (2 if cfg.normalization == "LayerNorm" else 1) * h
    qkv_out = (a + 2 * g) * d // tp
    n = 2 * norm + qkv_out * h + (qkv_out if cfg.add_qkv_bias else 0)
    n += h * a * d // tp + (h if cfg.add_bias_linear else 0)
    mats = 3 if cfg.activation == "swiglu" else 2
    n += mats * h * f // tp
    if cfg.add_bias_linear:
        n += (mats - 1) * f // tp + h
    return n


def embedding_params(cfg: TransformerConfig, kind: str, tp: int = 1) -> int:
    """Word / position / token-type tables (width --embedding-size or hidden) and, when
    factorized, the up-projection to hidden."""
    e, h = cfg.embedding_dim, cfg.hidden_size
    n = cfg.padded_vocab_size(tp) // tp * e
    if cfg.position_embedding_type == "learned_absolute":
        n += cfg.max_position_embeddings * e
    if cfg.factorized_embedding:
        n += e * h + (h if cfg.add_bias_linear else 0)
    return n + (2 * e if kind == "bert" else 0)


def head_params(cfg: TransformerConfig, kind: str, tp: int, has_embedding: bool,
                binary_head: bool) -> int:
    """Final norm, output layer (or the last stage's copy of a tied word table) and BERT heads."""
    h, e = cfg.hidden_size, cfg.embedding_dim
    vocab_local = cfg.padded_vocab_size(tp) // tp
    n = (2 if cfg.normalization == "LayerNorm" else 1) * h
    if cfg.untie_embeddings_and_output_weights:
        n += vocab_local * h
    elif not has_embedding:
        n += vocab_local * e
    if kind == "gpt" and cfg.factorized_embedding and not cfg.untie_embeddings_and_output_weights:
        n += h * e  # output_project: hidden -> E before the tied table
    if kind == "bert":
        n += h * e + e + 2 * e + vocab_local
        if binary_head:
            n += h * h + h + 2 * h + 2
    return n


def stage_weight_sets(cfg: TransformerConfig, pp: int, stage: int,
                      split: StageSplit = EVEN) -> int:
    """Distinct layer weight sets on a stage: its layers / --share-layers-every (sets never
    straddle stages). Activations and FLOPs still count every layer."""
    return stage_layers(cfg.num_layers, pp, split)[stage] // cfg.share_layers_every


def stage_params(cfg: TransformerConfig, kind: str, tp: int, pp: int, stage: int,
                 binary_head: bool = True, split: StageSplit = EVEN) -> int:
    """Elements held by one rank of pipeline stage `stage` (all its virtual chunks)."""
    n = stage_weight_sets(cfg, pp, stage, split) * layer_params(cfg, tp)
    first, last = stage == 0, stage == pp - 1
    if first:
        n += embedding_params(cfg, kind, tp)
    if last:
        n += head_params(cfg, kind, tp, first, binary_head)
    return n


def total_params(cfg: TransformerConfig, kind: str, binary_head: bool = True) -> tuple[int, int]:
    """(all parameters with the padded vocabulary, counted once; without embeddings)."""
    whole = stage_params(cfg, kind, 1, 1, 0, binary_head)
    emb = embedding_params(cfg, kind, 1)
    if cfg.untie_embeddings_and_output_weights:
        emb += cfg.padded_vocab_size(1) * cfg.hidden_size
    return whole, whole - emb


def matrix_params(cfg: TransformerConfig, kind: str, tp: int, pp: int, stage: int,
                  split: StageSplit = EVEN) -> int:
    """Parameters autocast casts to half precision (weights of every matmul)."""
    h, d, f = cfg.hidden_size, cfg.head_dim, cfg.ffn_hidden_size
    a, g = cfg.num_attention_heads, cfg.num_query_groups
    per_layer = ((a + 2 * g) * d * h + h * a * d
                 + (3 if cfg.activation == "swiglu" else 2) * h * f) // tp
    n = stage_weight_sets(cfg, pp, stage, split) * per_layer
    e, untied = cfg.embedding_dim, cfg.untie_embeddings_and_output_weights
    if stage == 0 and cfg.factorized_embedding:
        n += e * h  # embedding.project
    if stage == pp - 1:
        n += cfg.padded_vocab_size(tp) // tp * (h if untied else e)
        if kind == "bert":
            n += h * e + h * h  # LM-head dense, pooler
        elif cfg.factorized_embedding and not untied:
            n += h * e  # output_project
    return n


# -- activations -----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Shape:
    s: int
    b: int
    tp: int
    sp: bool
    e: int  # matmul output bytes
    m: int  # attention dropout mask bytes
    mh: int  # hidden dropout mask bytes

    @property
    def s_n(self) -> int:
        return self.s // self.tp if self.sp else self.s


def layer_activation_bytes(cfg: TransformerConfig, sh: _Shape, selective: bool = False,
                           device: str = "cpu", masked: bool = False, cp: int = 1) -> int:
    """Bytes one layer keeps for backward for one micro-batch (formula in the module doc; `sh.s`
    is this rank's share of the sequence under context parallelism `cp`); `device` ('cpu' or
    'cuda') and `masked` (attention gets a mask: BERT's padding, --reset-attention-mask)
    resolve attention_backend='auto'."""
    backend = attention_backend(cfg, device, masked, cp)
    fused, ring = backend == "fused", backend == "ring"
    s, b, t, e, m = sh.s, sh.b, sh.tp, sh.e, sh.m
    h, d, f = cfg.hidden_size, cfg.head_dim, cfg.ffn_hidden_size
    a, g = cfg.num_attention_heads, cfg.num_query_groups
    stats = 2 if cfg.normalization == "LayerNorm" else 1
    n = 2 * 4 * sh.s_n * b * h + 2 * 4 * stats * sh.s_n * b + 2 * e * s * b * h
    qkv_out = e * s * b * (a + 2 * g) * d // t
    heads_s2 = b * (a // t) * s * s
    rope = cfg.position_embedding_type == "rope"
    if rope:  # cos and sin of the q and k rotations
        n += 2 * 2 * 4 * s * (int(d * cfg.rotary_percent) // 2 * 2)
    # the core's inputs as a recompute (or the ring, which expands k/v per block) keeps them:
    # views of the qkv output, rotated q and k, or (grouped-query) q copied to merge its group
    # and head dims
    inputs = qkv_out + (e * s * b * (a + g) * d // t if rope else
                        e * s * b * a * d // t if g < a else 0)
    if selective:
        n += inputs
    elif ring:
        n += inputs + 4 * b * (a // t) * s  # + the log-sum-exp; its output is the context
    else:
        if g == a:  # q, k, v are views of the qkv output; RoPE adds rotated q and k
            n += qkv_out + (2 * e * s * b * a * d // t if rope else 0)
        else:  # q copied, k and v expanded to all heads
            n += 3 * e * s * b * a * d // t
        if fused:
            n += e * heads_s2
            if cfg.attention_dropout > 0:
                n += (m + e) * heads_s2
        else:
            n += 4 * b * (a // t) * s
    n += e * s * b * a * d // t  # context
    if cfg.hidden_dropout > 0:
        n += 2 * sh.mh * sh.s_n * b * h
    n += (4 if cfg.activation == "swiglu" else 2) * e * s * b * f // t
    if cfg.activation == "swiglu" and e < 4:  # gate and fc1 each cast the normed input
        n += e * s * b * h
    return n


def embedding_activation_bytes(cfg: TransformerConfig, sh: _Shape) -> int:
    ids = 8 * sh.b * sh.s * 2  # token and position ids
    if cfg.factorized_embedding:  # the up-projection keeps its [s, b, E] input
        ids += sh.e * sh.s * sh.b * cfg.embedding_dim
    return ids + (sh.mh * sh.s_n * sh.b * cfg.hidden_size if cfg.hidden_dropout > 0 else 0)


def logit_rows(kind: str, s: int, b: int, mask_prob: float) -> int:
    """Positions whose vocabulary logits a training step computes: all for GPT; for BERT the
    predicted ones only, at most round(mask_prob * s) + 1 per sample (the masking budget)."""
    return min(s, int(mask_prob * s + 0.5) + 1) * b if kind == "bert" else s * b


def head_activation_bytes(cfg: TransformerConfig, kind: str, sh: _Shape,
                          mask_prob: float = 0.15) -> int:
    s, b, h, e = sh.s, sh.b, cfg.hidden_size, cfg.embedding_dim
    vocab_local = cfg.padded_vocab_size(sh.tp) // sh.tp
    n = 4 * sh.s_n * b * h + 8 * sh.s_n * b + sh.e * s * b * h  # final norm in, stats, out
    rows = logit_rows(kind, s, b, mask_prob)
    if kind == "bert":  # dense and GELU outputs + the predicted rows' gathered norm output
        n += 2 * sh.e * s * b * e + sh.e * rows * e
    elif cfg.factorized_embedding and not cfg.untie_embeddings_and_output_weights:
        # output_project keeps the norm output ungathered; the logits keep its [s, b, E] output
        n += sh.e * (sh.s_n * b * h - s * b * h + s * b * e)
    return n + (4 + sh.e) * rows * vocab_local  # softmax kept by the loss + the live logits


def in_flight(schedule: str, pp: int, stage: int, num_microbatches: int, virtual: int) -> float:
    """Micro-batches whose activations a stage holds at once (in units of a whole stage's
    layers; interleaved chunks are counted as fractions)."""
    if pp == 1:
        return 1.0
    if schedule == "gpipe":
        return float(num_microbatches)
    if schedule == "interleaved" and virtual > 1:
        chunks = min(2 * (pp - stage - 1) + (virtual - 1) * pp + 1, num_microbatches * virtual)
        return chunks / virtual
    return float(min(pp - stage, num_microbatches))


# -- the estimate ----------------------------------------------------------------------------

def attention_backend(cfg: TransformerConfig, device: str, masked: bool = False,
                      cp: int = 1) -> str:
    """The attention backend a training step runs ('fused', 'sdpa', or 'ring' under context
    parallelism) on this device type. (An explicit 'sdpa' with attention dropout or a mask on a
    CPU runs torch's fallback paths, whose extra tensors this estimate does not count; 'auto'
    never picks them.)"""
    if cp > 1:
        return "ring"
    return resolve_backend(cfg.attention_backend, device, cfg.attention_dropout > 0, masked)


def _device(cfg: PretrainConfig) -> str:
    """The device type the estimate is for: the GPU path unless --device cpu (the machine that
    plans a run is rarely the one that trains it, so this host's devices do not decide)."""
    return "cpu" if cfg.train.device == "cpu" else "cuda"


def _mask_bytes(cfg: PretrainConfig, e: int) -> int:
    return 1 if _device(cfg) == "cuda" else e


def optimizer_bytes(params: int, dp: int, distributed: bool) -> int:
    """AdamW's exp_avg + exp_avg_sq (fp32) of `params` elements on one rank: all of them, or
    this rank's 1/`dp` share under the distributed optimizer (`dp`: the ranks of one optimizer
    instance, DP x CP / --num-distributed-optimizer-instances)."""
    return 8 * (-(-params // dp) if distributed else params)


def estimate(cfg: PretrainConfig, world_size: int, vocab_size: int) -> MemoryEstimate:
    """Per-rank numbers for `cfg` launched on `world_size` processes (validates like the run)."""
    checked = copy.deepcopy(cfg)
    if not (checked.data.data_path or checked.data.train_data_path):
        checked.data.data_path = ["<not needed for the estimate>"]
    plan = validate(checked, world_size, vocab_size)
    checked, dp = plan.config, plan.dp_size
    p, t = checked.parallel, checked.train
    tp, pp, cp = (p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                  p.context_parallel_size)
    kind = checked.model.model
    binary = kind == "bert" and checked.model.bert_binary_head
    mc = checked.transformer_config(vocab_size)
    num_mb = t.global_batch_size // (t.micro_batch_size * dp)
    virtual, split = plan.virtual_pipeline or 1, p.stage_split()
    layers = stage_layers(mc.num_layers, pp, split)
    autocast = t.bf16 or t.fp16
    e = 2 if autocast else 4
    sh = _Shape(mc.seq_length // cp, t.micro_batch_size, tp, p.sequence_parallel, e,
                _mask_bytes(checked, e), _mask_bytes(checked, 4 if mc.add_bias_linear else e))
    device = _device(checked)
    masked = kind == "bert" or checked.data.reset_attention_mask
    backend = attention_backend(mc, device, masked, cp)
    layer = layer_activation_bytes(mc, sh, device=device, masked=masked, cp=cp)
    layer_sel = layer_activation_bytes(mc, sh, selective=True, device=device, masked=masked,
                                       cp=cp)
    layer_input = 4 * sh.s_n * sh.b * mc.hidden_size
    largest = max(e * sh.s * sh.b * mc.ffn_hidden_size // tp,
                  e * sh.b * (mc.num_attention_heads // tp) * sh.s ** 2
                  if backend == "fused" else 0,
                  4 * sh.b * (mc.num_attention_heads // tp) * (sh.s // 2) ** 2  # a ring half-block
                  if backend == "ring" else 0,
                  4 * logit_rows(kind, sh.s, sh.b, checked.data.mask_prob)
                  * mc.padded_vocab_size(tp) // tp)
    stages = []
    middle = {1} if split != EVEN and pp > 2 else set()  # uneven: middle stages differ
    for stage in sorted({0, pp - 1} | middle):
        n, layers_per_stage = stage_params(mc, kind, tp, pp, stage, binary, split), layers[stage]
        extra = (embedding_activation_bytes(mc, sh) if stage == 0 else 0) + (
            head_activation_bytes(mc, kind, sh, checked.data.mask_prob) if stage == pp - 1 else 0)
        flight = in_flight(p.pipeline_schedule, pp, stage, num_mb, virtual)
        def held(per_layer: int, once: int = 0) -> int:
            return int(flight * (layers_per_stage * per_layer + extra)) + once
        stages.append(StageMemory(
            stage=stage, params=n, weights=4 * n, grads=4 * n,
            optimizer=optimizer_bytes(n, dp * cp // p.num_distributed_optimizer_instances,
                                      p.use_distributed_optimizer),
            autocast_cache=2 * matrix_params(mc, kind, tp, pp, stage, split) if autocast else 0,
            activations_per_microbatch=layers_per_stage * layer + extra,
            in_flight_microbatches=flight, activations=held(layer),
            activations_full_recompute=held(layer_input, layer),
            activations_selective_recompute=held(layer_sel, layer - layer_sel),
            transient=2 * largest))
    total, non_emb = total_params(mc, kind, binary)
    fpt = flops_per_token(mc, mc.seq_length, predicted_fraction=checked.data.mask_prob
                          if kind == "bert" else 1.0)
    step = fpt * t.global_batch_size * mc.seq_length
    return MemoryEstimate(total, non_emb, mc.padded_vocab_size(tp), world_size, tp, pp, dp,
                          num_mb, t.recompute_granularity, stages, fpt, step, step / world_size,
                          device, backend, p.use_distributed_optimizer, cp,
                          p.num_distributed_optimizer_instances)


# -- command line ----------------------------------------------------------------------------

def _fmt(n: float) -> str:
    return f"{n / GiB:9.3f} GiB"


def report(est: MemoryEstimate) -> str:
    lines = [f"parameters: {est.total_params:,} total, {est.non_embedding_params:,} "
             f"non-embedding (vocabulary padded to {est.padded_vocab_size} for TP={est.tp})",
             f"layout: world {est.world_size} = TP {est.tp} x "
             + (f"CP {est.cp} x " if est.cp > 1 else "") + f"PP {est.pp} x DP {est.dp}; "
             f"{est.num_microbatches} micro-batches per step per DP rank",
             f"assumed: device {est.device}" + (" (--device cpu estimates a CPU run)"
                                                if est.device == "cuda" else "")
             + f", attention backend {est.attention_backend} ("
             + ("ring attention of --context-parallel-size" if est.cp > 1
                else "--attention-backend") + ")"]
    for st in est.stages:
        lines += [f"pipeline stage {st.stage} (per rank): {st.params:,} parameters",
                  f"  weights (fp32)         {_fmt(st.weights)}",
                  f"  grads (fp32)           {_fmt(st.grads)}",
                  f"  AdamW state (2 x fp32) {_fmt(st.optimizer)}"
                  + (f" (1/{est.optimizer_shard}: distributed optimizer)"
                     if est.distributed_optimizer else "")]
        if st.autocast_cache:
            lines.append(f"  autocast weight cache  {_fmt(st.autocast_cache)}")
        lines += [f"  activations/micro-batch {_fmt(st.activations_per_microbatch)} x "
                  f"{st.in_flight_microbatches:g} in flight",
                  f"  activations: none {_fmt(st.activations)} | selective "
                  f"{_fmt(st.activations_selective_recompute)} | full "
                  f"{_fmt(st.activations_full_recompute)}",
                  f"  backward working set   {_fmt(st.transient)}",
                  f"  peak: none {_fmt(st.total(st.activations))} | selective "
                  f"{_fmt(st.total(st.activations_selective_recompute))} | full "
                  f"{_fmt(st.total(st.activations_full_recompute))}"]
    st = est.most_loaded
    lines += [f"most loaded rank: stage {st.stage}, peak {_fmt(est.peak_bytes())} with "
              f"--recompute-granularity {est.recompute or 'none'}",
              f"FLOPs: {est.flops_per_token:.4g}/token, {est.flops_per_step:.4g}/step, "
              f"{est.flops_per_rank_per_step:.4g}/step per rank"]
    if est.dp * est.cp > 1:
        lines.append(distributed_optimizer_line(est))
    return "\n".join(lines)


def distributed_optimizer_line(est: MemoryEstimate) -> str:
    """What --use-distributed-optimizer does (or did) to the most loaded rank's peak."""
    st = est.most_loaded
    full = optimizer_bytes(st.params, 1, False)
    sharded = optimizer_bytes(st.params, est.optimizer_shard, True)  # DP x CP / instances
    peak = est.peak_bytes()
    if est.distributed_optimizer:
        copies = (f" ({est.optimizer_instances} instances of DP x CP / "
                  f"{est.optimizer_instances} = {est.optimizer_shard} ranks)"
                  if est.optimizer_instances > 1 else "")
        return (f"--use-distributed-optimizer{copies}: AdamW state {_fmt(sharded).strip()} per "
                f"rank instead of {_fmt(full).strip()}; peak {_fmt(peak).strip()} instead of "
                f"{_fmt(peak - sharded + full).strip()}")
    return (f"with --use-distributed-optimizer: AdamW state {_fmt(sharded).strip()} per rank "
            f"instead of {_fmt(full).strip()}; peak {_fmt(peak - full + sharded).strip()} "
            f"instead of {_fmt(peak).strip()}")

"""Swap a built model's float layers for their int8 twins (megapre.compress.int8_layers).

Two uses: `quantize=True` turns a loaded float model into the quantized one (the quantize
command), `quantize=False` only gives a fresh model the quantized shapes and dtypes so a quantized
checkpoint loads into it (build_runtime does this when the run config records a quantization).

Quantized: every Column/RowParallelLinear inside the transformer blocks (attention qkv and proj,
MLP fc1, gate and fc2). The embeddings, norms, biases and classification heads stay floating
point; the GPT output layer becomes an int8 weight-only head with --quantize-lm-head (and the
float copy it replaces, an untied output layer or a last stage's tied word-table copy, goes
away; the input embedding keeps its float table).
"""
from __future__ import annotations

from torch import nn

from megapre.errors import ConfigError
from megapre.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megapre.parallel.mesh import ParallelMesh

from .config import QuantConfig
from .int8_layers import (INT8_LAYERS, Int8ColumnParallelLinear, Int8RowParallelLinear,
                          Int8VocabHead)

STACKS = ("decoder", "encoder")  # GPT's and BERT's transformer stacks


def block_linears(model: nn.Module) -> list[str]:
    """Names of the float linear layers inside the transformer blocks, in model order."""
    return [n for n, m in model.named_modules()
            if n.split(".", 1)[0] in STACKS
            and isinstance(m, (ColumnParallelLinear, RowParallelLinear))
            and not isinstance(m, INT8_LAYERS)]


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (*INT8_LAYERS, Int8VocabHead)) for m in model.modules())


def quantize_model(model: nn.Module, qcfg: QuantConfig, mesh: ParallelMesh,
                   quantize: bool = True) -> int:
    """Replace the block linears of `model` (an unwrapped GPTModel / BertModel piece) and, with
    --quantize-lm-head, its output layer; returns the number of layers replaced."""
    qcfg.validate()
    if is_quantized(model):
        raise ConfigError("the model is already quantized (quantize the float checkpoint)")
    if qcfg.quantize_lm_head and not hasattr(model, "output_quant"):
        raise ConfigError("--quantize-lm-head is for GPT checkpoints (this model has no GPT "
                          "output layer); drop the flag")
    names = block_linears(model)
    for name in names:
        parent, child = _parent(model, name)
        base = getattr(parent, child)
        kind = (Int8ColumnParallelLinear if isinstance(base, ColumnParallelLinear)
                else Int8RowParallelLinear)
        setattr(parent, child, kind.from_float(base, qcfg.mode, quantize))
    if qcfg.quantize_lm_head:
        names += _quantize_head(model, mesh, quantize)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return len(names)


def build_recorded(record: dict, models: list[nn.Module], mesh: ParallelMesh) -> None:
    """Give freshly built model pieces the int8 layers of a quantized checkpoint's recorded
    quantization (its config's `quantization`), empty, ready for the checkpoint load."""
    qcfg = QuantConfig.from_record(record)
    for piece in models:
        quantize_model(piece, qcfg, mesh, quantize=False)


def _quantize_head(model: nn.Module, mesh: ParallelMesh, quantize: bool) -> list[str]:
    if getattr(model, "task_head", None) is not None or not model.stage.is_last:
        return []
    table = model.output_layer.weight if model.output_layer is not None \
        else model.shared_embedding_weight()
    model.output_quant = Int8VocabHead(table, mesh, quantize)
    model.output_layer = None
    model.output_word = None  # a last stage's tied copy: only the head used it
    return ["output_quant"]


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, child = name.rpartition(".")
    return (model.get_submodule(path) if path else model), child

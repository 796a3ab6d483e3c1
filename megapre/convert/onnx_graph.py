"""The modules traced into ONNX graphs: a loaded TP1/PP1 model behind the input and output
conventions of Hugging Face / optimum exports (batch-major tensors, true vocabulary, 1 = real
token in `attention_mask`, `past_key.{i}` / `present_key.{i}` of [batch, kv_heads, seq,
head_dim]). They only reorder tensors: the math is the model's own forward (or, with a KV
cache, megapre.inference.kv_cache.stage_step, the generator's), run in export mode.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from megapre.inference.kv_cache import KVCache, stage_step


@dataclass(frozen=True)
class GraphSpec:
    """A traceable module with its example inputs, their ONNX names and dynamic axes."""

    module: nn.Module
    inputs: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    # input name -> {axis: symbolic name}; a name "a + b" is an axis the exporter derives
    dynamic: dict[str, dict[int, str]]
    varargs_from: int | None = None  # inputs from here on fill the forward's *args


class GPTLogits(nn.Module):
    """input_ids [b, s] -> logits [b, s, vocab]."""

    def __init__(self, model: nn.Module, vocab: int) -> None:
        super().__init__()
        self.model, self.vocab = model, vocab

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids).transpose(0, 1)[..., :self.vocab]


class GPTWithCache(nn.Module):
    """(input_ids [b, s], attention_mask [b, past + s], past_key.0, past_value.0, ...) ->
    (logits [b, s, vocab], present_key.0, present_value.0, ...). The past length is
    past_key.0's sequence axis (0 for the prompt). As in Hugging Face generation, a batch may
    be left-padded: attention_mask 0 marks padding keys, and each token's position is the
    number of real tokens before it (attention_mask.cumsum - 1)."""

    def __init__(self, model: nn.Module, vocab: int) -> None:
        super().__init__()
        self.model, self.vocab = model, vocab
        self.layer_ids = [i for i, _ in model.decoder.uses()]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cache = KVCache()
        for n, i in enumerate(self.layer_ids):  # [b, g, s, d] -> the cache's [s, b, g, d]
            cache.layers[i] = (past[2 * n].permute(2, 0, 1, 3), past[2 * n + 1].permute(2, 0, 1, 3))
        cache.length = past[0].shape[2]
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, cache.length:]
        logits = stage_step(self.model, cache, input_ids, positions=positions,
                            padding=attention_mask == 0)
        logits = logits.transpose(0, 1)[..., :self.vocab]
        present = [t.permute(1, 2, 0, 3) for i in self.layer_ids for t in cache.layers[i]]
        return (logits, *present)


class BertLM(nn.Module):
    """(input_ids, attention_mask, token_type_ids) [b, s] -> masked-LM logits [b, s, vocab]
    and, with the binary head, its logits [b, 2]."""

    def __init__(self, model: nn.Module, vocab: int) -> None:
        super().__init__()
        self.model, self.vocab = model, vocab

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, binary = self.model(input_ids, token_type_ids, padding_mask=attention_mask == 0)
        logits = logits.transpose(0, 1)[..., :self.vocab]
        return (logits,) if binary is None else (logits, binary)


class Classifier(nn.Module):
    """A fine-tuned model's task head: (input_ids, attention_mask[, token_type_ids]) [b, s] ->
    logits [b, classes]. Padding is on the right; the real lengths come from attention_mask
    (BERT also masks the padded keys; GPT's causal attention never sees them)."""

    def __init__(self, model: nn.Module, bert: bool) -> None:
        super().__init__()
        self.model, self.bert = model, bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        lengths = attention_mask.sum(-1)
        if self.bert:
            return self.model(input_ids, token_type_ids, padding_mask=attention_mask == 0,
                              lengths=lengths)
        return self.model(input_ids, lengths=lengths)


_BATCH_SEQ = {0: "batch", 1: "sequence"}


def _ids(batch: int, seq: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))


def gpt_spec(model: nn.Module, vocab: int, batch: int = 2, seq: int = 5) -> GraphSpec:
    return GraphSpec(GPTLogits(model, vocab), (_ids(batch, seq, vocab),), ["input_ids"],
                     ["logits"], {"input_ids": _BATCH_SEQ})


def gpt_cache_spec(model: nn.Module, vocab: int, batch: int = 2, seq: int = 5,
                   past: int = 3) -> GraphSpec:
    module = GPTWithCache(model, vocab)
    att = next(iter(model.decoder.layers.values())).attention
    kv = torch.zeros(batch, att.groups, past, att.head_dim)
    names = ["input_ids", "attention_mask"]
    dynamic = {"input_ids": _BATCH_SEQ,
               "attention_mask": {0: "batch", 1: "past_sequence + sequence"}}
    outputs = ["logits"]
    for i in range(len(module.layer_ids)):
        for kind in ("key", "value"):
            names.append(f"past_{kind}.{i}")
            outputs.append(f"present_{kind}.{i}")
            dynamic[names[-1]] = {0: "batch", 2: "past_sequence"}
    ids = _ids(batch, seq, vocab)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    inputs = (ids, mask, *[kv.clone() for _ in names[2:]])
    return GraphSpec(module, inputs, names, outputs, dynamic, varargs_from=2)


def bert_spec(model: nn.Module, vocab: int, batch: int = 2, seq: int = 5) -> GraphSpec:
    ids = _ids(batch, seq, vocab)
    outputs = ["logits"] + (["binary_logits"] if model.heads.binary is not None else [])
    names = ["input_ids", "attention_mask", "token_type_ids"]
    return GraphSpec(BertLM(model, vocab), (ids, torch.ones_like(ids), torch.zeros_like(ids)),
                     names, outputs, {n: _BATCH_SEQ for n in names})


def classifier_spec(model: nn.Module, vocab: int, bert: bool, batch: int = 2, seq: int = 5
                    ) -> GraphSpec:
    ids = _ids(batch, seq, vocab)
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if bert else [])
    inputs = (ids, torch.ones_like(ids)) + ((torch.zeros_like(ids),) if bert else ())
    return GraphSpec(Classifier(model, bert), inputs, names, ["logits"],
                     {n: _BATCH_SEQ for n in names})

"""Calibration: a few samples of a preprocessed dataset (--calib-data PREFIX, the .bin/.idx of
tools/preprocess_data.py) run through the float model while hooks record, for every linear layer
of the transformer blocks, the absolute maximum of each input channel (SmoothQuant's max|X_j|).

The dataset is opened through megapre.data's checked opener, so data made with another tokenizer
(its recorded fingerprint) or holding ids outside the checkpoint's vocabulary is refused with one
line before anything runs. Samples are the first N windows of seq-length tokens of the documents
in file order (end-of-document tokens included, as in pretraining): deterministic and cheap.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from megapre.data.errors import DataError
from megapre.data.indexed import IndexedDataset
from megapre.data.tokenizer_check import CheckedOpener, DataCheckConfig
from megapre.errors import ConfigError

from .structure import block_linears


def calibration_ids(prefix: str, tokenizer, seq_length: int, samples: int,
                    allow_tokenizer_mismatch: bool = False) -> torch.Tensor:
    """[samples, seq_length] token ids from the start of dataset `prefix`, checked against the
    checkpoint's tokenizer."""
    if samples < 1:
        raise ConfigError(f"--calib-samples {samples} must be a positive integer")
    if not IndexedDataset.exists(prefix):
        raise ConfigError(f"--calib-data {prefix}: no {prefix}.idx/.bin (give the prefix "
                          "tools/preprocess_data.py wrote, e.g. out/corpus_text_document)")
    try:
        dataset = CheckedOpener(tokenizer, DataCheckConfig(allow_tokenizer_mismatch))(prefix)
    except DataError as e:
        raise ConfigError("--calib-data: " + str(e).replace("--data-path ", "", 1)
                          .replace("train anyway", "calibrate anyway")) from None
    need, chunks, have = samples * seq_length, [], 0
    for i in range(len(dataset)):
        chunks.append(np.asarray(dataset[i], dtype=np.int64))
        have += len(chunks[-1])
        if have >= need:
            break
    if have < need:
        raise ConfigError(f"--calib-data {os.fspath(prefix)}: holds {have} tokens, fewer than "
                          f"--calib-samples {samples} x seq-length {seq_length}; lower "
                          "--calib-samples")
    return torch.from_numpy(np.concatenate(chunks)[:need]).view(samples, seq_length)


@torch.no_grad()
def activation_absmax(model: nn.Module, ids: torch.Tensor, micro_batch: int = 4
                      ) -> dict[str, torch.Tensor]:
    """{block linear name: float32 [in_features] max |input| per channel} over the samples `ids`
    [n, s] run through `model` (one process: a whole GPTModel)."""
    found: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(_module, args) -> None:
            x = args[0].detach().float().abs()
            amax = x.reshape(-1, x.shape[-1]).amax(0)
            found[name] = amax if name not in found else torch.maximum(found[name], amax)
        return record

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n))
               for n in block_linears(model)]
    try:
        model.eval()
        device = next(model.parameters()).device
        for start in range(0, ids.shape[0], micro_batch):
            model(input_ids=ids[start:start + micro_batch].to(device))
    finally:
        for h in handles:
            h.remove()
    return {k: v.cpu() for k, v in found.items()}

"""Hugging Face model directories for the conversion tests: random weights from configs (no
downloads), scaled up so greedy decoding is not decided by near-ties, and a small BPE tokenizer
trained here (tokenizer.json) whose size is the model's vocab_size."""
from __future__ import annotations

from pathlib import Path

import torch

TEXT = ("the quick brown fox jumps over the lazy dog. a stitch in time saves nine. "
        "to be or not to be, that is the question. all that glitters is not gold. ") * 40


def train_tokenizer(out: Path, vocab: int = 320) -> int:
    """tokenizer.json (byte-level BPE with an <|endoftext|> token) in `out`; returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    return tok.get_vocab_size()


def hf_model(kind: str, vocab: int, seed: int = 0, **overrides):
    """A transformers model with random weights (eval mode, fp32); x3 weights give decisive
    logits."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "gpt2":
        cfg = GPT2Config(**{"vocab_size": vocab, "n_positions": 64, "n_embd": 64, "n_layer": 2,
                            "n_head": 4, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
                            "attn_pdrop": 0.0, "bos_token_id": vocab - 1,
                            "eos_token_id": vocab - 1, **overrides})
        model = GPT2LMHeadModel(cfg)
    else:
        cfg = LlamaConfig(**{"vocab_size": vocab, "hidden_size": 64, "intermediate_size": 96,
                             "num_hidden_layers": 2, "num_attention_heads": 4,
                             "num_key_value_heads": 2, "max_position_embeddings": 64,
                             "rope_theta": 5000.0, "tie_word_embeddings": False,
                             "bos_token_id": 0, "eos_token_id": 0, **overrides})
        model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(3.0)
    return model.eval()


def hf_dir(kind: str, out: Path, *, tokenizer: bool = True, seed: int = 0, **overrides):
    """Save a model (and a tokenizer) as a Hugging Face directory; returns the model."""
    vocab = train_tokenizer(out) if tokenizer else 100
    model = hf_model(kind, vocab, seed, **overrides)
    model.save_pretrained(out)
    return model

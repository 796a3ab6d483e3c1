"""Hugging Face model directories for the conversion tests: random weights from configs (no
downloads), scaled up so greedy decoding is not decided by near-ties, and a small BPE tokenizer
trained here (tokenizer.json) whose size is the model's vocab_size; BERT directories take
bert-base-uncased's tokenizer files from the shared data."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

BERT_KINDS = ("megatron-bert", "bert")
BERT_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json")

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


def bert_model(kind: str, vocab: int, seed: int = 0, masked_lm: bool = False, **overrides):
    """A transformers BERT (MegatronBert pre-LN or Bert post-LN) *ForPreTraining, or *ForMaskedLM,
    with random weights (eval mode, fp32, x3 matrices as hf_model, random biases and norms)."""
    import transformers

    prefix = "MegatronBert" if kind == "megatron-bert" else "Bert"
    cfg = getattr(transformers, prefix + "Config")(**{
        "vocab_size": vocab, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 128, "max_position_embeddings": 64, "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, prefix + ("ForMaskedLM" if masked_lm else "ForPreTraining"))(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(3.0)
            else:  # biases and norms that are not zero and the identity
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def bert_dir(kind: str, out: Path, tokenizer_dir: Path, masked_lm: bool = False, **overrides):
    """Save a BERT model with `tokenizer_dir`'s WordPiece files as a Hugging Face directory."""
    out.mkdir(parents=True, exist_ok=True)
    for name in BERT_TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, out / name)
    vocab = sum(1 for _ in (tokenizer_dir / "vocab.txt").open(encoding="utf-8"))
    model = bert_model(kind, vocab, masked_lm=masked_lm, **overrides)
    model.save_pretrained(out)
    return model


def open_checkpoint(ckpt: Path, tp: int = 1, pp: int = 1):
    """The runtime of a converted checkpoint loaded in a (TP, PP) layout on the CPU."""
    from megapre.inference import checkpoint_io
    from megapre.train.runtime import build_runtime

    path = checkpoint_io.resolve(str(ckpt))
    cfg = checkpoint_io.saved_config(path)
    cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size = tp, pp
    cfg.train.device = "cpu"
    rt = build_runtime(cfg)
    checkpoint_io.load_weights(path, rt)
    return rt

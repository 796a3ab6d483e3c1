"""The data flags of a training run (Megatron names): which corpora and how they are split and
cached, the tokenizer, and the sample options. One section of megapre.train.args.PretrainConfig,
kept here so the data layer owns its flags and never imports the training layer.

Each field is a flag (`data_cache_path` is `--data-cache-path`); its metadata carries the help
text (and choices), the convention every section of PretrainConfig follows (megapre/flag_fields.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from megapre.data.blend import BlendConfig
from megapre.data.fim import FIMConfig
from megapre.data.index_cache import CacheConfig
from megapre.flag_fields import flag_field as _f


@dataclass
class DataArgs:
    data_path: list[str] = _f([], "blend: 'W1 PREFIX1 W2 PREFIX2 ...' or prefixes weighted by size")
    mock_data: bool = _f(False, "GPT: a synthetic corpus instead of --data-path (megatron-core's "
                         "mock documents), to try a launch line before preprocessing")
    split: str = _f("969,30,1", "train,valid,test proportions of --data-path")
    train_data_path: list[str] = _f([], "separate training blend")
    valid_data_path: list[str] = _f([], "separate validation blend")
    test_data_path: list[str] = _f([], "separate test blend")
    data_cache_path: str | None = _f(None, "where index files are cached (default: beside the data)")
    data_cache: bool = _f(True, "cache index files (--no-data-cache: build them in memory, write "
                          "nothing)")
    data_cache_node_local: bool = _f(False, "the cache directory is per node: local rank 0 of every "
                                     "node builds")
    data_cache_wait: float = _f(3600.0, "seconds to wait for another process building the same "
                                "indices")
    megatron_compatible_blend: bool = _f(False, "megatron-core's blend order (drifts up to ~1.7 "
                                         "samples from the weights)")
    tokenizer_type: str | None = _f(None, "GPT2BPETokenizer, BertWordPieceLowerCase, SentencePieceTokenizer, ...")
    vocab_file: str | None = _f(None, "tokenizer vocabulary file")
    merge_file: str | None = _f(None, "BPE merges file")
    tokenizer_model: str | None = _f(None, "SentencePiece .model or HF tokenizer.json")
    vocab_size: int | None = _f(None, "NullTokenizer vocabulary size")
    allow_tokenizer_mismatch: bool = _f(False, "train/evaluate/generate even when the tokenizer's "
                                        "fingerprint differs from the one recorded with the data "
                                        "or the checkpoint")
    num_workers: int = _f(2, "DataLoader workers")
    eod_mask_loss: bool = _f(False, "no loss on end-of-document tokens")
    reset_position_ids: bool = _f(False, "positions restart after each end-of-document")
    reset_attention_mask: bool = _f(False, "no attention across document boundaries")
    mask_prob: float = _f(0.15, "BERT: fraction of tokens masked")
    short_seq_prob: float = _f(0.1, "BERT: probability of a shorter sample")
    # Fill-in-the-middle (megapre/data/fim.py); Megatron's flags and defaults.
    fim_data: bool = _f(False, "GPT: fill-in-the-middle samples (PSM/SPM) over --data-path; "
                        "sentinels the tokenizer lacks are added to its vocabulary")
    fim_rate: float = _f(0.5, "FIM: probability that a document piece is rearranged")
    fim_spm_rate: float = _f(0.5, "FIM: probability that a rearranged piece is SPM, not PSM")
    fim_split_sample: str | None = _f(None, "FIM: token at which a piece is split into fragments "
                                      "rearranged separately (needs --fim-fragment-rate)")
    fim_fragment_rate: float | None = _f(None, "FIM: rate of each fragment under "
                                         "--fim-split-sample")
    fim_no_prefix: str | None = _f(None, "FIM: leave pieces whose text starts with this as they are")
    fim_prefix_token: str = _f("<fim_prefix>", "FIM prefix sentinel")
    fim_middle_token: str = _f("<fim_middle>", "FIM middle sentinel")
    fim_suffix_token: str = _f("<fim_suffix>", "FIM suffix sentinel")
    fim_pad_token: str = _f("<fim_pad>", "FIM padding token (no loss)")
    fim_eod_token: str = _f("<|endoftext|>", "FIM: the token between documents (a tokenizer "
                            "that spells its EOD otherwise uses its own)")

    def blend(self) -> BlendConfig:
        """Which corpora feed which split."""
        return BlendConfig(data_path=self.data_path or None, split=self.split,
                           train_data_path=self.train_data_path or None,
                           valid_data_path=self.valid_data_path or None,
                           test_data_path=self.test_data_path or None,
                           megatron_compatible_blend=self.megatron_compatible_blend)

    def fim(self, seed: int) -> FIMConfig:
        """The FIM settings (checked: rates in [0, 1]), with the run's --seed."""
        return FIMConfig(rate=self.fim_rate, spm_rate=self.fim_spm_rate,
                         split_sample=self.fim_split_sample, fragment_rate=self.fim_fragment_rate,
                         no_prefix=self.fim_no_prefix, prefix_token=self.fim_prefix_token,
                         middle_token=self.fim_middle_token, suffix_token=self.fim_suffix_token,
                         pad_token=self.fim_pad_token, eod_token=self.fim_eod_token, seed=seed)

    def cache(self) -> CacheConfig:
        """Where and how the sample indices are cached."""
        return CacheConfig(cache_dir=self.data_cache_path, enabled=self.data_cache,
                           node_local=self.data_cache_node_local,
                           wait_timeout_s=self.data_cache_wait)

"""Worker-side work: one raw batch -> parsed records -> one encode_batch call per key -> flat numpy
token arrays + lengths. Returning a few arrays per batch (instead of a list of ints per document)
is what keeps inter-process traffic cheap."""
from __future__ import annotations

import itertools
import os
import signal
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from megapre.data.preprocess.chunking import MAX_CHARS, encode_long
from megapre.data.preprocess.readers import RawBatch
from megapre.data.preprocess.records import parse_batch
from megapre.data.preprocess.sentences import split_sentences


@dataclass(frozen=True)
class EncodeConfig:
    keys: tuple[str, ...]
    append_eod: bool
    split_sentences: bool
    keep_newlines: bool
    dtype: str                 # numpy dtype name of the output tokens
    max_chars: int = MAX_CHARS  # longer texts are tokenized in pieces (chunking.py)


@dataclass
class EncodedBatch:
    """Documents of one raw batch that survived, per key: all tokens concatenated, the length of
    each sequence, and the number of sequences of each document (None: one sequence each)."""

    file_id: int
    num_docs: int
    tokens: list[np.ndarray]
    seq_lengths: list[np.ndarray]
    doc_seqs: list[np.ndarray | None]
    skips: list[tuple[int, str, str]]       # (line, reason, detail), in line order
    nbytes: int
    file_skip: Any = None                   # a file-level Skip passed through (kind "skip")


class Encoder:
    """Callable turning a RawBatch into an EncodedBatch with `tokenizer` (the Tokenizer interface:
    encode_batch, eod)."""

    def __init__(self, tokenizer: Any, config: EncodeConfig) -> None:
        if config.append_eod and tokenizer.eod is None:
            raise ValueError(f"--append-eod: tokenizer {tokenizer.name} has no end-of-document token")
        self.tokenizer = tokenizer
        self.config = config
        self.dtype = np.dtype(config.dtype)

    def __call__(self, batch: RawBatch) -> EncodedBatch:
        if batch.kind == "skip":
            return EncodedBatch(batch.file_id, 0, *self._empty(), [], 0, file_skip=batch.payload)
        records = parse_batch(batch, self.config.keys)
        n = len(records.texts)
        keep = np.ones(n, dtype=bool)
        failures: dict[int, str] = {}
        per_key = []
        for k in range(len(self.config.keys)):
            docs, failed = self._encode_key([t[k] for t in records.texts])
            per_key.append(docs)
            failures.update((i, msg) for i, msg in failed.items() if i not in failures)
            keep &= np.fromiter(map(bool, docs), dtype=bool, count=n)
        skips = list(records.skips)
        if not keep.all():
            for i in np.flatnonzero(~keep).tolist():
                if i in failures:
                    skips.append((records.lines[i], "tokenizer_error", failures[i]))
                else:
                    skips.append((records.lines[i], "empty_document", "no tokens after tokenization"))
            skips.sort(key=lambda s: s[0])
        tokens, lengths, doc_seqs = [], [], []
        mask = keep.tolist()
        for docs in per_key:
            t, l, d = self._pack(docs if all(mask) else list(itertools.compress(docs, mask)))
            tokens.append(t)
            lengths.append(l)
            doc_seqs.append(d)
        return EncodedBatch(batch.file_id, int(keep.sum()), tokens, lengths, doc_seqs, skips,
                            batch.nbytes)

    def _encode_texts(self, texts: list[str]) -> tuple[list[Any], dict[int, str]]:
        """Ids of each text (a list, or an int64 array for a text longer than max_chars, which is
        tokenized piece by piece in bounded memory), and the texts the tokenizer failed on
        (index -> message, their ids empty)."""
        limit = self.config.max_chars
        short = [i for i, t in enumerate(texts) if len(t) <= limit]
        ids: list[Any] = [[] for _ in texts]
        short_ids, short_failed = self._encode_short([texts[i] for i in short])
        failed = {short[j]: msg for j, msg in short_failed.items()}
        for j, i in enumerate(short):
            ids[i] = short_ids[j]
        for i in (i for i, t in enumerate(texts) if len(t) > limit):
            try:
                ids[i] = encode_long(lambda p: self.tokenizer.encode_batch([p])[0], texts[i], limit)
            except Exception as e:  # noqa: BLE001 - reported per record as tokenizer_error
                failed[i] = f"{type(e).__name__}: {e}"[:200]
        return ids, failed

    def _encode_short(self, texts: list[str]) -> tuple[list[list[int]], dict[int, str]]:
        """encode_batch, or, if the tokenizer raises, one text at a time so that only the texts
        it cannot encode are lost (returned as index -> message, their ids empty)."""
        if not texts:
            return [], {}
        try:
            return self.tokenizer.encode_batch(texts), {}
        except Exception:  # noqa: BLE001 - isolate the offending text below
            pass
        ids, failed = [], {}
        for i, text in enumerate(texts):
            try:
                ids.append(self.tokenizer.encode_batch([text])[0])
            except Exception as e:  # noqa: BLE001 - reported per record as tokenizer_error
                ids.append([])
                failed[i] = f"{type(e).__name__}: {e}"[:200]
        return ids, failed

    def _encode_key(self, texts: list[str]) -> tuple[list[list[list[int]]], dict[int, str]]:
        """Per document, its sequences' token ids (empty sequences dropped; EOD appended to the
        document's last sequence; a document with no tokens is an empty list), and the documents
        the tokenizer failed on (index -> message)."""
        cfg = self.config
        if not cfg.split_sentences:
            ids, failed = self._encode_texts(texts)
            docs = [[x] if len(x) else [] for x in ids]
        else:
            sents = [split_sentences(t, cfg.keep_newlines) for t in texts]
            flat_ids, flat_failed = self._encode_texts(list(itertools.chain.from_iterable(sents)))
            docs, failed, pos = [], {}, 0
            for i, s in enumerate(sents):
                bad = [flat_failed[j] for j in range(pos, pos + len(s)) if j in flat_failed]
                if bad:
                    failed[i] = bad[0]
                docs.append([] if bad else [x for x in flat_ids[pos:pos + len(s)] if len(x)])
                pos += len(s)
        for i in failed:
            docs[i] = []
        if cfg.append_eod:
            eod = self.tokenizer.eod
            for d in docs:
                if d:
                    d[-1] = (np.append(d[-1], eod) if isinstance(d[-1], np.ndarray)
                             else [*d[-1], eod])
        return docs, failed

    def _pack(self, docs: Sequence[list[list[int]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        seqs = list(itertools.chain.from_iterable(docs))
        lengths = np.fromiter(map(len, seqs), dtype=np.int32, count=len(seqs))
        total = int(lengths.sum(dtype=np.int64))
        try:
            tokens = self._flatten(seqs, total)
        except OverflowError as e:
            raise ValueError(f"token id does not fit the output dtype {self.dtype} "
                             f"(tokenizer vocab_size {self.tokenizer.vocab_size})") from e
        doc_seqs = None
        if self.config.split_sentences:
            doc_seqs = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
        return tokens, lengths, doc_seqs

    def _flatten(self, seqs: list[Any], total: int) -> np.ndarray:
        """All sequences as one array of the output dtype (arrays from long texts are joined
        without iterating their elements)."""
        if not any(isinstance(x, np.ndarray) for x in seqs):
            return np.fromiter(itertools.chain.from_iterable(seqs), dtype=self.dtype, count=total)
        joined = np.concatenate([np.asarray(x, dtype=np.int64) for x in seqs]) if seqs else np.zeros(0, np.int64)
        info = np.iinfo(self.dtype)
        if joined.size and (joined.min() < info.min or joined.max() > info.max):
            raise OverflowError("token id out of range")
        return joined.astype(self.dtype)

    def _empty(self) -> tuple[list, list, list]:
        n = len(self.config.keys)
        return ([np.zeros(0, self.dtype)] * n, [np.zeros(0, np.int32)] * n,
                [np.zeros(0, np.int64) if self.config.split_sentences else None] * n)


# ----------------------------------------------------------------------------- worker process

_WORKER_ENCODER: Encoder | None = None


def init_worker(tokenizer: Any, config: EncodeConfig) -> None:
    """Pool initializer. Under fork the tokenizer arrives as the parent's object (no pickling, no
    rebuild: building GPT-2 BPE takes a second or more); under spawn it is pickled, which rebuilds it
    from its config. Single-threaded: parallelism comes from the worker processes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the main process's to handle
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    global _WORKER_ENCODER
    _WORKER_ENCODER = Encoder(tokenizer, config)


def encode_in_worker(batch: RawBatch) -> EncodedBatch:
    assert _WORKER_ENCODER is not None, "init_worker did not run"
    return _WORKER_ENCODER(batch)

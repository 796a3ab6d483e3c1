"""Megatron "MMIDIDX" indexed datasets: a memory-mapped reader and a streaming writer.

A dataset at path prefix P is two files. ``P.bin`` holds the tokens of every sequence, concatenated,
with no header. ``P.idx`` describes them (all integers little-endian)::

    bytes 0-8    magic b"MMIDIDX\\x00\\x00"
    bytes 9-16   u64 version (1)
    byte  17     u8 dtype code (see DTYPE_CODES)
    bytes 18-25  u64 S, the number of sequences
    bytes 26-33  u64 D, the length of the document index (documents + 1)
    then         int32[S] sequence lengths (tokens), int64[S] byte offsets into P.bin,
                 int64[D] document index: document i is sequences [di[i], di[i+1]), di[0]=0, di[-1]=S

The arrays start at byte 34 and are therefore unaligned; they are used in place as read-only numpy
views. The layout is Megatron-LM's, byte for byte, so files move freely between the two projects.

The reader checks every size, offset and index against the file lengths when it opens a dataset, so
a truncated, mismatched or foreign file fails at once with an error naming the file, rather than as
garbage tokens hours into training. The writer streams tokens to a temporary file and only renames
its outputs into place once both are complete and synced, so a killed run never leaves a pair of
files that looks valid.
"""
from __future__ import annotations

import array
import os
import secrets
import struct
import sys
from typing import Any, Callable, Sequence

import numpy as np

from megapre.data.errors import DataError

__all__ = [
    "DTYPE_CODES",
    "IndexedDataset",
    "IndexedDatasetBuilder",
    "IndexedDatasetError",
    "merge_datasets",
    "optimal_dtype",
]

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = 34  # magic 9 + version 8 + dtype code 1 + S 8 + D 8
_HEADER = struct.Struct("<9sQBQQ")
assert _HEADER.size == HEADER_SIZE

DTYPE_CODES: dict[int, type] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_CODE_OF = {np.dtype(t): code for code, t in DTYPE_CODES.items()}

_MAX_SEQUENCE_LENGTH = np.iinfo(np.int32).max  # lengths are stored as int32
_CHECK_CHUNK = 1 << 22  # entries per chunk when scanning index arrays (bounded temporaries)
_COPY_CHUNK = 1 << 24  # bytes per chunk when copying .bin data (16 MiB)
_WRITE_BUFFER = 1 << 22  # write buffer of the .bin stream (4 MiB)


class IndexedDatasetError(DataError):
    """An indexed dataset file is missing, truncated, inconsistent or not in MMIDIDX format."""


def optimal_dtype(vocab_size: int) -> np.dtype:
    """The token dtype Megatron picks for a vocabulary: uint16 below 65500 ids, else int32."""
    return np.dtype(np.uint16) if vocab_size is not None and vocab_size < 65500 else np.dtype(np.int32)


def idx_path(path_prefix: str | os.PathLike) -> str:
    return os.fspath(path_prefix) + ".idx"


def bin_path(path_prefix: str | os.PathLike) -> str:
    return os.fspath(path_prefix) + ".bin"


def _token_dtype(dtype: Any) -> np.dtype:
    """Normalise a user dtype to a little-endian one that has a Megatron code, or explain."""
    try:
        dt = np.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"dtype {dtype!r} is not a numpy dtype") from e
    dt = dt.newbyteorder("<") if dt.byteorder == ">" else dt
    if np.dtype(dt.type) not in _CODE_OF:
        names = ", ".join(np.dtype(t).name for t in DTYPE_CODES.values())
        raise ValueError(f"dtype {dt.name} cannot be stored in an MMIDIDX dataset; use one of: {names}")
    return np.dtype(dt.type).newbyteorder("<")


def sequence_pointers(lengths: np.ndarray, itemsize: int, start: int = 0) -> np.ndarray:
    """Byte offset of each sequence when sequences are packed back to back (int64: files pass 4 GiB)."""
    out = np.empty(len(lengths), dtype=np.int64)
    if len(lengths):
        out[0] = start
        np.cumsum(lengths[:-1], dtype=np.int64, out=out[1:])
        out[1:] *= itemsize
        out[1:] += start
    return out


# ------------------------------------------------------------------------------------------------
# Reader
# ------------------------------------------------------------------------------------------------


def _missing_file_error(path: str, prefix: str) -> IndexedDatasetError:
    hint = "check --data-path / the prefix (a prefix P names P.bin and P.idx)"
    for ext in (".bin", ".idx"):
        if prefix.endswith(ext) and os.path.exists(prefix):
            hint = f"pass the prefix without the extension: {prefix[: -len(ext)]!r}"
    return IndexedDatasetError(f"{path}: file not found; {hint}")


def _file_identity(path: str) -> tuple[int, int, int, int]:
    """(device, inode, size, mtime): changes whenever the file is replaced or rewritten."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _read_header(path: str) -> tuple[np.dtype, int, int]:
    """Parse and check the 34-byte header and the .idx size it implies; returns (dtype, S, D)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(HEADER_SIZE)
    if head[: len(MAGIC)] != MAGIC[: len(head)]:
        raise IndexedDatasetError(
            f"{path}: not an MMIDIDX index (magic bytes {head[:9]!r}, expected {MAGIC!r}); "
            "the file is not a Megatron/megapre .idx file (the old non-mmap 'TNTIDX' format is not supported)"
        )
    if len(head) < HEADER_SIZE:
        raise IndexedDatasetError(
            f"{path}: truncated MMIDIDX header ({size} bytes, need {HEADER_SIZE}); rebuild the dataset"
        )
    _, version, code, n_seq, n_doc_idx = _HEADER.unpack(head)
    if version != VERSION:
        raise IndexedDatasetError(
            f"{path}: unsupported MMIDIDX version {version} (only version {VERSION} exists); "
            "the file is corrupt or from an incompatible writer"
        )
    if code not in DTYPE_CODES:
        raise IndexedDatasetError(
            f"{path}: unknown dtype code {code} (valid codes: {sorted(DTYPE_CODES)}); the file is corrupt"
        )
    expected = HEADER_SIZE + 12 * n_seq + 8 * n_doc_idx
    if size != expected:
        what = "truncated" if size < expected else "has extra bytes"
        extra = ""
        if size == expected + n_seq and n_seq:
            extra = " (the extra bytes look like Megatron's multimodal sequence modes, which megapre does not read)"
        raise IndexedDatasetError(
            f"{path}: {what}: the header declares {n_seq} sequences and a document index of {n_doc_idx} "
            f"entries, which needs {expected} bytes, but the file has {size}{extra}; "
            "the file was cut short or overwritten: rebuild it"
        )
    if n_doc_idx < 1:
        raise IndexedDatasetError(
            f"{path}: the document index is empty (it must hold at least [0]); the file is corrupt"
        )
    return np.dtype(DTYPE_CODES[code]).newbyteorder("<"), n_seq, n_doc_idx


def _check_sequences(path: str, bpath: str, lengths, pointers, itemsize: int, bin_size: int) -> int:
    """Check every sequence lies inside the .bin file; returns the total number of tokens.

    Runs once per open over the whole index, so the common (valid) case is a few vectorised
    reductions per chunk; the offending entry is located only when a chunk fails."""
    tokens = extent = 0
    for lo in range(0, len(lengths), _CHECK_CHUNK):
        ln = np.array(lengths[lo : lo + _CHECK_CHUNK])  # aligned copies: faster than unaligned views
        pt = np.array(pointers[lo : lo + _CHECK_CHUNK])
        if ln.min() < 0 or pt.min() < 0 or (itemsize > 1 and (pt & (itemsize - 1)).any()):
            i = int(np.flatnonzero((ln < 0) | (pt < 0) | (pt % itemsize != 0))[0])
            raise IndexedDatasetError(
                f"{path}: sequence {lo + i} has length {int(ln[i])} and byte offset {int(pt[i])} "
                f"(lengths must be >= 0, offsets >= 0 and multiples of the {itemsize}-byte token size); "
                "the index is corrupt: rebuild it"
            )
        ends = ln.astype(np.int64)
        ends *= itemsize
        ends += pt
        last = int(ends.max())
        if last > bin_size:
            i = int(np.flatnonzero(ends > bin_size)[0])
            raise IndexedDatasetError(
                f"{bpath}: too short for its index {path}: sequence {lo + i} ends at byte {int(ends[i])} "
                f"but the .bin file has {bin_size} bytes; the .bin was truncated or belongs to another "
                "index: rebuild the dataset"
            )
        tokens += int(ln.sum(dtype=np.int64))
        extent = max(extent, last)
    if extent != bin_size:
        raise IndexedDatasetError(
            f"{bpath}: has {bin_size} bytes but its index {path} describes only {extent}; the two files "
            "do not belong together (mixed runs or an interrupted copy): rebuild the dataset"
        )
    return tokens


def _check_document_index(path: str, doc_idx, n_seq: int) -> None:
    if int(doc_idx[0]) != 0 or int(doc_idx[-1]) != n_seq:
        raise IndexedDatasetError(
            f"{path}: the document index must start at 0 and end at the sequence count {n_seq}, "
            f"but runs from {int(doc_idx[0])} to {int(doc_idx[-1])}; the index is corrupt: rebuild it"
        )
    for lo in range(0, len(doc_idx) - 1, _CHECK_CHUNK):
        chunk = np.array(doc_idx[lo : lo + _CHECK_CHUNK + 1])
        if (chunk[1:] < chunk[:-1]).any():
            i = lo + int(np.flatnonzero(chunk[1:] < chunk[:-1])[0])
            raise IndexedDatasetError(
                f"{path}: the document index decreases at entry {i + 1} "
                f"({int(chunk[i - lo])} -> {int(chunk[i - lo + 1])}); the index is corrupt: rebuild it"
            )


class IndexedDataset:
    """Read-only view of the MMIDIDX dataset at ``path_prefix`` (``.bin`` + ``.idx``).

    Items are zero-copy numpy views into the memory-mapped ``.bin``: opening a dataset costs one
    validation pass over the index, and reading any sequence is O(1). Pickling stores only the prefix
    and reopens the maps on load, so DataLoader workers share the page cache instead of copying.
    ``sequence_lengths``, ``sequence_pointers`` and ``document_indices`` are read-only views into the
    ``.idx`` map (unaligned, as the format places them at byte 34).
    """

    def __init__(self, path_prefix: str | os.PathLike) -> None:
        self._open(os.fspath(path_prefix))

    def _open(self, prefix: str, validated: dict | None = None) -> None:
        """Map the files after checking them. ``validated`` (from a pickle) carries the identity
        of files this object already scanned in the parent process: if both files are unchanged,
        the O(S) scans are skipped, so DataLoader workers reopen in O(1)."""
        ipath, bpath = idx_path(prefix), bin_path(prefix)
        for p in (ipath, bpath):
            if not os.path.isfile(p):
                raise _missing_file_error(p, prefix)
        identity = (_file_identity(ipath), _file_identity(bpath))
        dtype, n_seq, n_doc_idx = _read_header(ipath)
        # An .idx is never empty (header), so it can always be mapped.
        idx_map = np.memmap(ipath, dtype=np.uint8, mode="r")
        off = HEADER_SIZE
        lengths = np.frombuffer(idx_map, dtype="<i4", count=n_seq, offset=off)
        off += 4 * n_seq
        pointers = np.frombuffer(idx_map, dtype="<i8", count=n_seq, offset=off)
        off += 8 * n_seq
        doc_idx = np.frombuffer(idx_map, dtype="<i8", count=n_doc_idx, offset=off)
        bin_size = identity[1][2]
        if validated is not None and validated["identity"] == identity:
            num_tokens = validated["num_tokens"]
        else:
            num_tokens = _check_sequences(ipath, bpath, lengths, pointers, dtype.itemsize, bin_size)
            _check_document_index(ipath, doc_idx, n_seq)

        self.path_prefix: str = prefix
        self.dtype: np.dtype = dtype
        self.sequence_lengths: np.ndarray = lengths
        self.sequence_pointers: np.ndarray = pointers
        self.document_indices: np.ndarray = doc_idx
        self.num_documents: int = n_doc_idx - 1
        self.num_tokens: int = num_tokens
        self._idx_map = idx_map
        self._identity = identity
        # numpy cannot map an empty file; an empty dataset reads from an empty buffer instead.
        self._bin = np.memmap(bpath, dtype=np.uint8, mode="r") if bin_size else np.empty(0, np.uint8)

    @staticmethod
    def exists(path_prefix: str | os.PathLike) -> bool:
        """True when both files of the prefix exist (a writer in progress has neither)."""
        return os.path.isfile(idx_path(path_prefix)) and os.path.isfile(bin_path(path_prefix))

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def _index(self, idx: int) -> int:
        n = len(self.sequence_lengths)
        i = int(idx)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence index {idx} out of range for {n} sequences in {self.path_prefix}")
        return i

    def __getitem__(self, idx: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                raise ValueError(f"slices of an IndexedDataset must be contiguous (step 1), got step {step}")
            return [self.get(i) for i in range(start, stop)]
        i = self._index(idx)
        return np.frombuffer(
            self._bin, dtype=self.dtype, count=int(self.sequence_lengths[i]),
            offset=int(self.sequence_pointers[i]),
        )

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``idx`` (to its end when length is None)."""
        i = self._index(idx)
        n = int(self.sequence_lengths[i])
        if length is None:
            length = n - offset
        if offset < 0 or length < 0 or offset + length > n:
            raise IndexError(
                f"tokens [{offset}, {offset + length}) out of range for sequence {idx} of length {n} "
                f"in {self.path_prefix}"
            )
        start = int(self.sequence_pointers[i]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin, dtype=self.dtype, count=length, offset=start)

    def sample_tokens(self, windows: int = 16, window: int = 1 << 16) -> np.ndarray:
        """Tokens of `windows` evenly spaced stretches of the .bin (all of it when small): a cheap
        look at the ids, e.g. to check them against a vocabulary at open."""
        tokens = np.frombuffer(self._bin, dtype=self.dtype, count=len(self._bin) // self.dtype.itemsize)
        if tokens.size <= windows * window:
            return tokens
        starts = np.linspace(0, tokens.size - window, windows).astype(np.int64)
        return np.concatenate([tokens[s : s + window] for s in starts.tolist()])

    def document(self, doc: int) -> tuple[int, int]:
        """The sequence range [first, last) of document ``doc``."""
        if not 0 <= doc < self.num_documents:
            raise IndexError(f"document {doc} out of range for {self.num_documents} documents in {self.path_prefix}")
        return int(self.document_indices[doc]), int(self.document_indices[doc + 1])

    def __getstate__(self) -> dict:
        return {"path_prefix": self.path_prefix,
                "validated": {"identity": self._identity, "num_tokens": self.num_tokens}}

    def __setstate__(self, state: dict) -> None:
        self._open(state["path_prefix"], state.get("validated"))

    def __repr__(self) -> str:
        return (
            f"IndexedDataset({self.path_prefix!r}, dtype={self.dtype.name}, sequences={len(self)}, "
            f"documents={self.num_documents}, tokens={self.num_tokens})"
        )


# ------------------------------------------------------------------------------------------------
# Writer
# ------------------------------------------------------------------------------------------------


def _as_tokens(tokens: Any, dtype: np.dtype) -> np.ndarray:
    """Convert ``tokens`` to a 1-D little-endian array of ``dtype``, refusing values it cannot hold."""
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"tokens must be a 1-D sequence, got an array of shape {arr.shape}")
    if arr.dtype == dtype:
        return np.ascontiguousarray(arr)
    if arr.size == 0:
        return np.empty(0, dtype)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"tokens must be numbers, got dtype {arr.dtype}")
    if dtype.kind in "iu":
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr) & (arr == np.round(arr))):
            bad = arr[~(np.isfinite(arr) & (arr == np.round(arr)))][0]
            raise ValueError(f"token value {bad} is not an integer; cannot store it as {dtype.name}")
        info = np.iinfo(dtype)
        lo, hi = arr.min(), arr.max()
        if lo < info.min or hi > info.max:
            bad = lo if lo < info.min else hi
            raise ValueError(
                f"token value {bad} does not fit dtype {dtype.name} (range {info.min}..{info.max}); "
                "choose a wider dtype (e.g. optimal_dtype(vocab_size)) or check the tokenizer"
            )
    return arr.astype(dtype)


class IndexedDatasetBuilder:
    """Streams documents into the MMIDIDX dataset ``path_prefix``; nothing appears there until
    :meth:`finalize`.

    Tokens go straight to a temporary ``.bin`` (``P.bin.tmp-<pid>-<random>``, a name no reader takes
    for a dataset); only the int32 sequence lengths and int64 document boundaries stay in memory
    (4 bytes per sequence + 8 per document; offsets are derived at finalize). ``finalize`` writes the index, syncs both files and renames them over
    any previous dataset, index last, so at every instant P.idx is either absent, the old complete
    index, or the new complete one. Used as a context manager, an exception aborts (temporaries
    removed, an existing dataset left untouched) and a clean exit finalizes.
    """

    def __init__(self, path_prefix: str | os.PathLike, dtype: Any) -> None:
        self.path_prefix = os.fspath(path_prefix)
        self.dtype = _token_dtype(dtype)
        directory = os.path.dirname(os.path.abspath(self.path_prefix))
        if os.path.isdir(self.path_prefix) or self.path_prefix.endswith(os.sep):
            raise IndexedDatasetError(
                f"{self.path_prefix}: is a directory; give a path prefix such as {os.path.join(self.path_prefix, 'name')}"
            )
        if not os.path.isdir(directory):
            raise IndexedDatasetError(
                f"{self.path_prefix}: output directory {directory} does not exist; create it first"
            )
        fd, self._tmp_bin = _create_temp(bin_path(self.path_prefix))
        self._tmp_idx: str | None = None
        self._bin = os.fdopen(fd, "wb", buffering=_WRITE_BUFFER)
        self._lengths = array.array("i")  # int32 per sequence
        self._doc_idx = array.array("q", [0])  # int64 document boundaries
        self._open = True

    # -- adding data ------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if not self._open:
            raise RuntimeError(f"IndexedDatasetBuilder for {self.path_prefix} is already finalized or aborted")

    def add_sequence(self, tokens: Any) -> None:
        """Append one sequence to the current document (close it with :meth:`end_document`)."""
        self._check_open()
        arr = _as_tokens(tokens, self.dtype)
        if arr.size > _MAX_SEQUENCE_LENGTH:
            raise ValueError(f"sequence of {arr.size} tokens exceeds the format's int32 length limit")
        self._write(memoryview(arr).cast("B"))
        self._lengths.append(arr.size)

    def end_document(self) -> None:
        """Close the current document: it spans the sequences added since the previous one."""
        self._check_open()
        self._doc_idx.append(len(self._lengths))

    def add_document(self, tokens: Any, sequence_lengths: Sequence[int] | None = None) -> None:
        """Append one document: ``tokens`` split into sequences of ``sequence_lengths`` (BERT
        sentences), or a single sequence when None. ``sequence_lengths=[]`` with no tokens adds an
        empty document (no sequences)."""
        self._check_open()
        arr = _as_tokens(tokens, self.dtype)
        if sequence_lengths is None:
            if arr.size > _MAX_SEQUENCE_LENGTH:
                raise ValueError(f"sequence of {arr.size} tokens exceeds the format's int32 length limit")
        else:
            sl = np.asarray(sequence_lengths, dtype=np.int64).reshape(-1)
            if sl.size and (sl.min() < 0 or sl.max() > _MAX_SEQUENCE_LENGTH):
                raise ValueError(f"sequence lengths must be in 0..{_MAX_SEQUENCE_LENGTH}, got {sl.tolist()[:8]}")
            if int(sl.sum()) != arr.size:
                raise ValueError(
                    f"sequence_lengths sum to {int(sl.sum())} but the document has {arr.size} tokens"
                )
        self._write(memoryview(arr).cast("B"))
        if sequence_lengths is None:
            self._lengths.append(arr.size)
        else:
            self._lengths.frombytes(sl.astype(np.int32).tobytes())
        self._doc_idx.append(len(self._lengths))

    def add_index(self, other_prefix: str | os.PathLike | IndexedDataset) -> None:
        """Append every document of the dataset at ``other_prefix`` (a merge; an open
        IndexedDataset is accepted too). Its document index is shifted by the sequences already
        written; its tokens are copied in large chunks."""
        self._check_open()
        if len(self._lengths) != self._doc_idx[-1]:
            raise ValueError(
                f"add_index({str(other_prefix)!r}) inside an open document: call end_document() first"
            )
        other = other_prefix if isinstance(other_prefix, IndexedDataset) else IndexedDataset(other_prefix)
        if other.dtype != self.dtype:
            raise IndexedDatasetError(
                f"{other.path_prefix}: token dtype {other.dtype.name} differs from the output's "
                f"{self.dtype.name}; datasets can only be merged when their dtypes match "
                "(re-preprocess with the same tokenizer / dtype)"
            )
        try:
            self._copy_tokens(other)
            shift = len(self._lengths)
            for lo in range(0, len(other), _CHECK_CHUNK):
                chunk = np.asarray(other.sequence_lengths[lo : lo + _CHECK_CHUNK], np.int32)
                self._lengths.frombytes(chunk.tobytes())
            for lo in range(1, len(other.document_indices), _CHECK_CHUNK):
                chunk = np.asarray(other.document_indices[lo : lo + _CHECK_CHUNK], np.int64) + shift
                self._doc_idx.frombytes(chunk.tobytes())
        except BaseException:
            self.abort()  # a partial append cannot be undone in the stream
            raise

    def _write(self, data: memoryview) -> None:
        try:
            self._bin.write(data)
        except OSError:
            self.abort()  # e.g. disk full: the stream is now incomplete, so nothing of it may survive
            raise

    def _copy_tokens(self, other: IndexedDataset) -> None:
        if not _is_packed(other):
            # Sequences stored out of order or with gaps: copy each one, in order, from the map.
            for i in range(len(other)):
                self._bin.write(memoryview(other[i]).cast("B"))
            return
        # The common case (every Megatron/megapre writer): the .bin is the sequences in order, so
        # copy exactly the bytes that were validated, in large chunks, never the whole file at once.
        path, remaining = bin_path(other.path_prefix), other.num_tokens * other.dtype.itemsize
        buf = memoryview(bytearray(min(_COPY_CHUNK, max(remaining, 1))))
        with open(path, "rb", buffering=0) as src:
            while remaining:
                n = src.readinto(buf[: min(len(buf), remaining)])
                if not n:
                    raise IndexedDatasetError(f"{path}: shrank while being copied; was it rewritten during the merge?")
                self._bin.write(buf[:n])
                remaining -= n

    # -- finishing --------------------------------------------------------------------------------

    def finalize(self) -> None:
        """Write the index and move both files into place (previous dataset replaced atomically
        enough that no mixed pair is ever valid)."""
        self._check_open()
        if len(self._lengths) != self._doc_idx[-1]:
            raise ValueError(
                f"{len(self._lengths) - self._doc_idx[-1]} sequences were added after the last "
                f"end_document() for {self.path_prefix}; call end_document() before finalize()"
            )
        try:
            self._bin.flush()
            os.fsync(self._bin.fileno())
            self._bin.close()
            self._write_index()
            self._commit()
        except BaseException:
            self.abort()
            raise
        self._open = False

    def _write_index(self) -> None:
        fd, self._tmp_idx = _create_temp(idx_path(self.path_prefix))
        lengths = np.frombuffer(self._lengths, dtype=np.int32)
        doc_idx = np.frombuffer(self._doc_idx, dtype=np.int64)
        with os.fdopen(fd, "wb", buffering=_WRITE_BUFFER) as f:
            f.write(_HEADER.pack(MAGIC, VERSION, _CODE_OF[np.dtype(self.dtype.type)], len(lengths), len(doc_idx)))
            f.write(_le(lengths, "<i4"))
            start = 0
            for lo in range(0, len(lengths), _CHECK_CHUNK):
                chunk = lengths[lo : lo + _CHECK_CHUNK]
                ptr = sequence_pointers(chunk, self.dtype.itemsize, start)
                f.write(_le(ptr, "<i8"))
                start = int(ptr[-1]) + int(chunk[-1]) * self.dtype.itemsize
            f.write(_le(doc_idx, "<i8"))
            f.flush()
            os.fsync(f.fileno())

    def _commit(self) -> None:
        # Index last: removing the old index first means an interruption between the renames leaves
        # a .bin without an .idx (never valid), not a new .bin paired with the old index.
        final_idx, final_bin = idx_path(self.path_prefix), bin_path(self.path_prefix)
        if os.path.lexists(final_idx):
            os.unlink(final_idx)
        os.replace(self._tmp_bin, final_bin)
        os.replace(self._tmp_idx, final_idx)  # type: ignore[arg-type]
        _fsync_dir(os.path.dirname(os.path.abspath(self.path_prefix)))

    def abort(self) -> None:
        """Discard everything written so far; an existing dataset at the prefix is left as it was."""
        self._open = False
        try:
            self._bin.close()
        except Exception:
            pass
        for p in (self._tmp_bin, self._tmp_idx):
            if p and os.path.exists(p):
                os.unlink(p)

    def __enter__(self) -> "IndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif self._open:
            self.finalize()

    def __del__(self) -> None:
        # A builder dropped without finalize/abort must not leave its temporaries behind.
        if getattr(self, "_open", False):
            try:
                self.abort()
            except Exception:
                pass


def _create_temp(final: str) -> tuple[int, str]:
    """Create ``<final>.tmp-<pid>-<random>`` exclusively, with the permissions a plain open() would
    give (mkstemp's 0600 would make shared datasets unreadable to others)."""
    while True:
        path = f"{final}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path
        except FileExistsError:
            continue


def _is_packed(ds: IndexedDataset) -> bool:
    """True when the sequences lie back to back in index order from byte 0 (a plain byte copy of
    the .bin then reproduces them)."""
    start = 0
    for lo in range(0, len(ds), _CHECK_CHUNK):
        lengths = np.asarray(ds.sequence_lengths[lo : lo + _CHECK_CHUNK])
        if not np.array_equal(ds.sequence_pointers[lo : lo + _CHECK_CHUNK], sequence_pointers(lengths, ds.dtype.itemsize, start)):
            return False
        start += int(lengths.sum(dtype=np.int64)) * ds.dtype.itemsize
    return True


def _le(arr: np.ndarray, dtype: str) -> memoryview:
    """Bytes of ``arr`` in little-endian ``dtype`` without a copy on little-endian machines."""
    if sys.byteorder != "little" or arr.dtype != np.dtype(dtype):
        arr = arr.astype(dtype)
    return memoryview(np.ascontiguousarray(arr)).cast("B")


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def merge_datasets(
    prefixes: Sequence[str | os.PathLike],
    out_prefix: str | os.PathLike,
    dtype: Any = None,
    *,
    progress: Callable[[int, IndexedDataset], None] | None = None,
) -> None:
    """Concatenate the datasets at ``prefixes`` (in order) into ``out_prefix``.

    ``dtype`` defaults to the first input's; every input must have it. Inputs are validated before
    anything is written, so a bad shard fails fast with its name instead of after copying the rest.
    ``progress(k, dataset)`` is called before input k is copied.
    """
    prefixes = [os.fspath(p) for p in prefixes]
    if not prefixes:
        raise ValueError("merge_datasets needs at least one input prefix")
    out = os.path.abspath(os.fspath(out_prefix))
    for p in prefixes:
        if os.path.abspath(p) == out:
            raise ValueError(f"output prefix {os.fspath(out_prefix)} is also an input; choose another output prefix")
    opened = [IndexedDataset(p) for p in prefixes]
    target = _token_dtype(dtype) if dtype is not None else opened[0].dtype
    for ds in opened:
        if ds.dtype != target:
            raise IndexedDatasetError(
                f"{ds.path_prefix}: token dtype {ds.dtype.name} differs from {target.name} "
                f"(dtype of {'the dtype argument' if dtype is not None else opened[0].path_prefix}); "
                "datasets can only be merged when their dtypes match"
            )
    with IndexedDatasetBuilder(out_prefix, target) as builder:
        for k, ds in enumerate(opened):
            if progress is not None:
                progress(k, ds)
            builder.add_index(ds)

"""MMIDIDX reader/writer: byte layout, round trips, validation of bad files, atomic writes, merging,
and compatibility in both directions with megatron-core's implementation."""
from __future__ import annotations

import os
import pickle
import re
import signal
import struct
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from megapre.data.indexed import (
    DTYPE_CODES,
    IndexedDataset,
    IndexedDatasetBuilder,
    IndexedDatasetError,
    merge_datasets,
    optimal_dtype,
    sequence_pointers,
)

REPO = Path(__file__).resolve().parents[2]


def _docs(rng: np.random.Generator, n: int, lo: int, hi: int) -> list[list[np.ndarray]]:
    """Random documents, each a list of 1-3 sequences (some empty) with values in [lo, hi]."""
    docs = []
    for _ in range(n):
        k = int(rng.integers(1, 4))
        docs.append([rng.integers(lo, hi, int(rng.integers(0, 40)), endpoint=True) for _ in range(k)])
    return docs


def _write(prefix: Path, dtype, docs) -> None:
    with IndexedDatasetBuilder(prefix, dtype) as b:
        for seqs in docs:
            b.add_document(np.concatenate(seqs), [len(s) for s in seqs])


def _assert_holds(ds: IndexedDataset, docs) -> None:
    flat = [s for seqs in docs for s in seqs]
    assert len(ds) == len(flat)
    assert ds.num_documents == len(docs)
    assert ds.num_tokens == sum(len(s) for s in flat)
    for i, s in enumerate(flat):
        np.testing.assert_array_equal(ds[i], s)
        assert ds[i].dtype == ds.dtype
    first = 0
    for d, seqs in enumerate(docs):
        assert ds.document(d) == (first, first + len(seqs))
        first += len(seqs)


# ------------------------------------------------------------------------------------------------
# Layout and round trips
# ------------------------------------------------------------------------------------------------


def test_byte_layout_is_megatrons(tmp_path):
    p = tmp_path / "d"
    with IndexedDatasetBuilder(p, np.uint16) as b:
        b.add_document([1, 2, 3])
        b.add_document([7, 8, 9, 10], [1, 3])
    idx = (tmp_path / "d.idx").read_bytes()
    expected = (
        b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + bytes([8]) + struct.pack("<QQ", 3, 3)
        + struct.pack("<3i", 3, 1, 3) + struct.pack("<3q", 0, 6, 8) + struct.pack("<3q", 0, 1, 3)
    )
    assert idx == expected
    assert (tmp_path / "d.bin").read_bytes() == struct.pack("<7H", 1, 2, 3, 7, 8, 9, 10)


@pytest.mark.parametrize("code", sorted(DTYPE_CODES))
def test_round_trip_every_dtype(tmp_path, code):
    dtype = np.dtype(DTYPE_CODES[code])
    if dtype.kind == "f":
        lo, hi = -1000, 1000
    else:
        info = np.iinfo(dtype)
        lo, hi = int(info.min), int(info.max)
    rng = np.random.default_rng(code)
    docs = _docs(rng, 30, lo, hi) + [[np.array([lo, hi, 0])]]  # the extremes survive
    docs = [[s.astype(dtype) for s in seqs] for seqs in docs]
    _write(tmp_path / "d", dtype, docs)
    ds = IndexedDataset(tmp_path / "d")
    assert ds.dtype == dtype
    assert (tmp_path / "d.idx").read_bytes()[17] == code
    _assert_holds(ds, docs)


def test_incremental_documents_empty_docs_and_empty_sequences(tmp_path):
    with IndexedDatasetBuilder(tmp_path / "d", np.int32) as b:
        b.add_sequence([1, 2])
        b.add_sequence([])
        b.add_sequence(np.array([3], np.int64))
        b.end_document()
        b.add_document([], [])  # a document without sequences
        b.add_document([])  # a document with one empty sequence
        b.add_document([5, 6, 7], np.array([0, 3, 0]))
    ds = IndexedDataset(tmp_path / "d")
    assert ds.sequence_lengths.tolist() == [2, 0, 1, 0, 0, 3, 0]
    assert ds.document_indices.tolist() == [0, 3, 3, 4, 7]
    assert ds.sequence_pointers.tolist() == [0, 8, 8, 12, 12, 12, 24]
    assert ds.num_documents == 4 and ds.num_tokens == 6
    assert ds[5].tolist() == [5, 6, 7] and ds[1].size == 0


def test_empty_dataset(tmp_path):
    IndexedDatasetBuilder(tmp_path / "e", np.uint16).finalize()
    assert (tmp_path / "e.bin").stat().st_size == 0
    ds = IndexedDataset(tmp_path / "e")
    assert len(ds) == 0 and ds.num_documents == 0 and ds.num_tokens == 0
    assert ds.document_indices.tolist() == [0]
    with pytest.raises(IndexError):
        ds[0]
    assert len(pickle.loads(pickle.dumps(ds))) == 0


def test_long_sequence_and_int64_pointers(tmp_path):
    long = np.arange(3_000_000, dtype=np.int64) % 65000
    with IndexedDatasetBuilder(tmp_path / "d", np.uint16) as b:
        b.add_document([1])
        b.add_document(long)
        b.add_document([2, 3])
    ds = IndexedDataset(tmp_path / "d")
    np.testing.assert_array_equal(ds[1], long)
    assert ds.sequence_pointers.tolist() == [0, 2, 2 + 2 * 3_000_000]
    # Offsets past 4 GiB: computed in int64 from int32 lengths, no wrap-around.
    lengths = np.full(5, np.iinfo(np.int32).max, dtype=np.int32)
    ptr = sequence_pointers(lengths, 8)
    assert ptr.dtype == np.int64 and ptr[-1] == 4 * 8 * (2**31 - 1)


def test_partial_reads_views_and_indexing(tmp_path):
    _write(tmp_path / "d", np.uint16, [[np.arange(10)], [np.arange(100, 105), np.arange(200, 203)]])
    ds = IndexedDataset(tmp_path / "d")
    assert ds.get(0, 3, 4).tolist() == [3, 4, 5, 6]
    assert ds.get(0, 7).tolist() == [7, 8, 9]
    assert ds.get(2, 3, 0).tolist() == []
    assert ds.get(-1).tolist() == [200, 201, 202]
    assert ds[np.int64(1)].tolist() == [100, 101, 102, 103, 104]
    assert [s.tolist() for s in ds[1:3]] == [[100, 101, 102, 103, 104], [200, 201, 202]]
    for bad in [(0, 8, 3), (0, -1, 2), (0, 0, 11), (1, 0, -1)]:
        with pytest.raises(IndexError, match="out of range for sequence"):
            ds.get(*bad)
    with pytest.raises(IndexError, match="out of range for 3 sequences"):
        ds[3]
    with pytest.raises(ValueError, match="contiguous"):
        ds[::2]
    view = ds.get(0, 2, 3)
    assert np.shares_memory(view, ds._bin) and not view.flags.writeable  # zero copy, read-only


def test_pickle_reopens(tmp_path):
    _write(tmp_path / "d", np.int32, [[np.arange(5)], [np.arange(3)]])
    ds = IndexedDataset(tmp_path / "d")
    blob = pickle.dumps(ds)
    assert len(blob) < 500  # the prefix, not the data
    back = pickle.loads(blob)
    assert back.path_prefix == ds.path_prefix and back.dtype == ds.dtype
    np.testing.assert_array_equal(back[0], ds[0])
    np.testing.assert_array_equal(back.document_indices, ds.document_indices)


def test_unpickle_skips_the_scan_only_for_unchanged_files(tmp_path, monkeypatch):
    import megapre.data.indexed as indexed

    _write(tmp_path / "d", np.uint16, [[np.arange(5)], [np.arange(3)]])
    blob = pickle.dumps(IndexedDataset(tmp_path / "d"))
    scans = []
    real = indexed._check_sequences
    monkeypatch.setattr(indexed, "_check_sequences", lambda *a: scans.append(1) or real(*a))
    assert pickle.loads(blob).num_tokens == 8 and scans == []
    # Rewritten in place with the same sizes (a corrupt length): the worker must scan again and fail.
    raw = bytearray((tmp_path / "d.idx").read_bytes())
    raw[34:38] = struct.pack("<i", 9)
    mtime = (tmp_path / "d.idx").stat().st_mtime_ns
    (tmp_path / "d.idx").write_bytes(bytes(raw))
    os.utime(tmp_path / "d.idx", ns=(mtime + 10**9, mtime + 10**9))  # whatever the fs timestamp granularity
    with pytest.raises(IndexedDatasetError, match="sequence 0 ends at byte 18"):
        pickle.loads(blob)
    assert scans == [1]


def test_optimal_dtype_and_exists(tmp_path):
    assert optimal_dtype(50257) == np.uint16 and optimal_dtype(65499) == np.uint16
    assert optimal_dtype(65500) == np.int32 and optimal_dtype(128256) == np.int32
    assert not IndexedDataset.exists(tmp_path / "d")
    _write(tmp_path / "d", np.uint8, [[np.arange(3)]])
    assert IndexedDataset.exists(tmp_path / "d")
    (tmp_path / "d.bin").unlink()
    assert not IndexedDataset.exists(tmp_path / "d")


# ------------------------------------------------------------------------------------------------
# Bad files: every defect is caught on open, with the file named
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def good(tmp_path) -> Path:
    """A valid uint16 dataset: 3 sequences [2, 3, 1] in documents [0, 2, 3]."""
    p = tmp_path / "g"
    with IndexedDatasetBuilder(p, np.uint16) as b:
        b.add_document([1, 2, 3, 4, 5], [2, 3])
        b.add_document([6])
    return p


def _patch(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


# offsets in the .idx of `good`: lengths at 34, pointers at 46, document index at 70
_LEN, _PTR, _DOC = 34, 34 + 12, 34 + 12 + 24


@pytest.mark.parametrize(
    "damage, which, message",
    [
        (lambda i, b: i.write_bytes(b"hello world, this is not an index" * 3), "idx", "not an MMIDIDX index"),
        (lambda i, b: i.write_bytes(i.read_bytes()[:20]), "idx", "truncated MMIDIDX header"),
        (lambda i, b: i.write_bytes(b""), "idx", "truncated MMIDIDX header"),
        (lambda i, b: _patch(i, 9, struct.pack("<Q", 2)), "idx", "unsupported MMIDIDX version 2"),
        (lambda i, b: _patch(i, 17, bytes([0])), "idx", "unknown dtype code 0"),
        (lambda i, b: _patch(i, 17, bytes([9])), "idx", "unknown dtype code 9"),
        (lambda i, b: i.write_bytes(i.read_bytes()[:-1]), "idx", "truncated: the header declares 3 sequences"),
        (lambda i, b: i.write_bytes(i.read_bytes() + b"\x00"), "idx", "has extra bytes"),
        (lambda i, b: i.write_bytes(i.read_bytes() + b"\x00" * 3), "idx", "multimodal"),
        (lambda i, b: _patch(i, 18, struct.pack("<Q", 2**40)), "idx", "truncated: the header declares 1099511627776"),
        (lambda i, b: _patch(i, 26, struct.pack("<Q", 0)), "idx", "has extra bytes"),
        (lambda i, b: b.write_bytes(b.read_bytes()[:-2]), "bin", "too short for its index"),
        (lambda i, b: b.write_bytes(b.read_bytes() + b"\x00\x00"), "bin", "do not belong together"),
        (lambda i, b: _patch(i, _PTR + 8, struct.pack("<q", 5)), "idx", "multiples of the 2-byte token size"),
        (lambda i, b: _patch(i, _PTR + 8, struct.pack("<q", -4)), "idx", "has length 3 and byte offset -4"),
        (lambda i, b: _patch(i, _LEN, struct.pack("<i", -1)), "idx", "has length -1"),
        (lambda i, b: _patch(i, _LEN + 8, struct.pack("<i", 2)), "bin", "sequence 2 ends at byte 14"),
        (lambda i, b: _patch(i, _DOC, struct.pack("<q", 1)), "idx", "must start at 0 and end at the sequence count 3"),
        (lambda i, b: _patch(i, _DOC + 16, struct.pack("<q", 2)), "idx", "runs from 0 to 2"),
        (lambda i, b: _patch(i, _DOC + 8, struct.pack("<q", 7)), "idx", "decreases at entry 2 (7 -> 3)"),
    ],
)
def test_bad_files_raise_named_errors(good, damage, which, message):
    ipath, bpath = Path(f"{good}.idx"), Path(f"{good}.bin")
    IndexedDataset(good)
    damage(ipath, bpath)
    with pytest.raises(IndexedDatasetError, match=re.escape(message)) as err:
        IndexedDataset(good)
    named = ipath if which == "idx" else bpath
    assert str(err.value).startswith(str(named)), str(err.value)
    assert isinstance(err.value, ValueError)


def test_empty_document_index_is_an_error(tmp_path):
    p = tmp_path / "d"
    (tmp_path / "d.idx").write_bytes(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, 0, 0))
    (tmp_path / "d.bin").write_bytes(b"")
    with pytest.raises(IndexedDatasetError, match="document index is empty"):
        IndexedDataset(p)


def test_missing_files(good):
    with pytest.raises(IndexedDatasetError, match=r"nope\.idx: file not found"):
        IndexedDataset(good.parent / "nope")
    with pytest.raises(IndexedDatasetError, match="pass the prefix without the extension"):
        IndexedDataset(f"{good}.idx")
    Path(f"{good}.bin").unlink()
    with pytest.raises(IndexedDatasetError, match=r"g\.bin: file not found"):
        IndexedDataset(good)


# ------------------------------------------------------------------------------------------------
# Writer input checks and atomicity
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, tokens, message",
    [
        (np.uint16, [1, 65536], "token value 65536 does not fit dtype uint16"),
        (np.uint16, [-1, 3], "token value -1 does not fit dtype uint16"),
        (np.int8, np.array([127, 128]), "token value 128 does not fit dtype int8"),
        (np.int32, [2**31], "token value 2147483648 does not fit dtype int32"),
        (np.uint16, [1.5], "token value 1.5 is not an integer"),
        (np.uint16, [[1, 2]], "1-D"),
        (np.uint16, ["a"], "must be numbers"),
    ],
)
def test_writer_rejects_bad_tokens(tmp_path, dtype, tokens, message):
    with IndexedDatasetBuilder(tmp_path / "d", dtype) as b:
        with pytest.raises(ValueError, match=message):
            b.add_document(tokens)
        with pytest.raises(ValueError, match=message):
            b.add_sequence(tokens)
        b.add_document([1.0, 2.0])  # integral floats are fine
    assert IndexedDataset(tmp_path / "d")[0].tolist() == [1, 2]


def test_writer_misuse(tmp_path):
    with pytest.raises(ValueError, match="cannot be stored"):
        IndexedDatasetBuilder(tmp_path / "d", np.uint32)
    with pytest.raises(IndexedDatasetError, match="does not exist"):
        IndexedDatasetBuilder(tmp_path / "no" / "d", np.uint16)
    with pytest.raises(IndexedDatasetError, match="is a directory"):
        IndexedDatasetBuilder(tmp_path, np.uint16)
    b = IndexedDatasetBuilder(tmp_path / "d", np.uint16)
    with pytest.raises(ValueError, match="sum to 3 but the document has 2 tokens"):
        b.add_document([1, 2], [1, 2])
    with pytest.raises(ValueError, match="sequence lengths must be in"):
        b.add_document([1, 2], [3, -1])
    b.add_sequence([1])
    with pytest.raises(ValueError, match="call end_document"):
        b.finalize()
    b.end_document()
    b.finalize()
    with pytest.raises(RuntimeError, match="already finalized"):
        b.add_document([1])
    assert len(IndexedDataset(tmp_path / "d")) == 1


def _outputs(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir())


def test_exception_inside_builder_leaves_nothing(tmp_path):
    with pytest.raises(KeyError):
        with IndexedDatasetBuilder(tmp_path / "d", np.uint16) as b:
            b.add_document([1, 2, 3])
            raise KeyError("boom")
    assert _outputs(tmp_path) == []
    b = IndexedDatasetBuilder(tmp_path / "d", np.uint16)
    b.add_document([1])
    b.abort()
    assert _outputs(tmp_path) == []


def test_write_failure_aborts(tmp_path):
    class DiskFull:
        def write(self, data):
            raise OSError(28, "No space left on device")

        def close(self):
            pass

    b = IndexedDatasetBuilder(tmp_path / "d", np.uint16)
    b.add_document([1, 2])
    b._bin.close()
    b._bin = DiskFull()
    with pytest.raises(OSError, match="No space left"):
        b.add_document([3])
    assert _outputs(tmp_path) == []
    with pytest.raises(RuntimeError, match="already finalized or aborted"):
        b.add_document([4])


def test_dropped_builder_removes_its_temporaries(tmp_path):
    b = IndexedDatasetBuilder(tmp_path / "d", np.uint16)
    b.add_document([1, 2])
    assert len(_outputs(tmp_path)) == 1
    del b
    assert _outputs(tmp_path) == []


def test_failed_rewrite_keeps_the_old_dataset(good, monkeypatch):
    before = (Path(f"{good}.idx").read_bytes(), Path(f"{good}.bin").read_bytes())
    with pytest.raises(RuntimeError):
        with IndexedDatasetBuilder(good, np.uint16) as b:
            b.add_document([9, 9, 9])
            raise RuntimeError("interrupted")
    b = IndexedDatasetBuilder(good, np.uint16)
    b.add_document([9])
    monkeypatch.setattr(b, "_write_index", lambda: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        b.finalize()
    assert (Path(f"{good}.idx").read_bytes(), Path(f"{good}.bin").read_bytes()) == before
    assert _outputs(good.parent) == ["g.bin", "g.idx"]
    IndexedDataset(good)


def test_outputs_get_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        _write(tmp_path / "d", np.uint16, [[np.arange(3)]])
    finally:
        os.umask(old)
    for ext in ("bin", "idx"):
        assert (tmp_path / f"d.{ext}").stat().st_mode & 0o777 == 0o644


_KILLED_WRITER = """
import sys, numpy as np
from megapre.data.indexed import IndexedDatasetBuilder
b = IndexedDatasetBuilder(sys.argv[1], np.uint16)
rng = np.random.default_rng(0)
n = 0
while True:
    b.add_document(rng.integers(0, 60000, 5000))
    n += 1
    if n == 200:
        b._bin.flush()
        print("writing", flush=True)
"""


@pytest.mark.slow
def test_killed_writer_leaves_no_valid_dataset(good):
    before = (Path(f"{good}.idx").read_bytes(), Path(f"{good}.bin").read_bytes())
    for prefix in (good.parent / "fresh", good):  # a new prefix, and a rewrite of an existing one
        proc = subprocess.Popen(
            [sys.executable, "-c", _KILLED_WRITER, str(prefix)], cwd=REPO, stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        try:
            assert proc.stdout.readline().strip() == b"writing"
            time.sleep(0.2)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        names = _outputs(good.parent)
        temps = [n for n in names if ".tmp-" in n]
        assert temps and all(not n.endswith((".bin", ".idx")) for n in temps), names
        assert not IndexedDataset.exists(good.parent / "fresh")
        for t in temps:
            (good.parent / t).unlink()
    assert (Path(f"{good}.idx").read_bytes(), Path(f"{good}.bin").read_bytes()) == before


# ------------------------------------------------------------------------------------------------
# Merging
# ------------------------------------------------------------------------------------------------


def test_merge_shifts_document_index(tmp_path):
    rng = np.random.default_rng(1)
    parts = [_docs(rng, 7, 0, 60000), [], _docs(rng, 1, 0, 60000), _docs(rng, 12, 0, 60000)]
    for k, docs in enumerate(parts):
        _write(tmp_path / f"p{k}", np.uint16, docs)
    merge_datasets([tmp_path / f"p{k}" for k in range(4)], tmp_path / "m")
    merged = IndexedDataset(tmp_path / "m")
    all_docs = [d for docs in parts for d in docs]
    _assert_holds(merged, all_docs)
    _write(tmp_path / "direct", np.uint16, all_docs)
    assert (tmp_path / "m.idx").read_bytes() == (tmp_path / "direct.idx").read_bytes()
    assert (tmp_path / "m.bin").read_bytes() == (tmp_path / "direct.bin").read_bytes()


def test_merge_copies_in_chunks(tmp_path, monkeypatch):
    import megapre.data.indexed as indexed

    monkeypatch.setattr(indexed, "_COPY_CHUNK", 7)  # odd size: chunk edges fall inside tokens
    docs = _docs(np.random.default_rng(3), 20, 0, 2**31 - 1)
    _write(tmp_path / "a", np.int32, docs)
    merge_datasets([tmp_path / "a", tmp_path / "a"], tmp_path / "m")
    _assert_holds(IndexedDataset(tmp_path / "m"), docs + docs)


def test_merge_mixed_with_new_documents_and_unpacked_source(tmp_path):
    _write(tmp_path / "a", np.int32, [[np.array([1, 2])], [np.array([3]), np.array([4, 5])]])
    # A foreign but valid file whose sequences are stored in reverse order in the .bin.
    (tmp_path / "r.bin").write_bytes(np.array([30, 31, 20, 10, 11, 12], "<i4").tobytes())
    (tmp_path / "r.idx").write_bytes(
        b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 4, 3, 3)
        + np.array([3, 1, 2], "<i4").tobytes() + np.array([12, 8, 0], "<i8").tobytes()
        + np.array([0, 2, 3], "<i8").tobytes()
    )
    assert IndexedDataset(tmp_path / "r")[0].tolist() == [10, 11, 12]
    with IndexedDatasetBuilder(tmp_path / "m", np.int32) as b:
        b.add_document([7])
        b.add_index(tmp_path / "a")
        b.add_index(tmp_path / "r")
        b.add_document([8, 9], [1, 1])
    m = IndexedDataset(tmp_path / "m")
    assert [m[i].tolist() for i in range(len(m))] == [[7], [1, 2], [3], [4, 5], [10, 11, 12], [20], [30, 31], [8], [9]]
    assert m.document_indices.tolist() == [0, 1, 2, 4, 6, 7, 9]
    assert m.sequence_pointers.tolist() == sequence_pointers(m.sequence_lengths, 4).tolist()


def test_merge_errors(tmp_path):
    _write(tmp_path / "a", np.uint16, [[np.arange(3)]])
    _write(tmp_path / "b", np.int32, [[np.arange(3)]])
    with pytest.raises(IndexedDatasetError, match=r"b: token dtype int32 differs from uint16"):
        merge_datasets([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    with pytest.raises(IndexedDatasetError, match=r"missing\.idx: file not found"):
        merge_datasets([tmp_path / "a", tmp_path / "missing"], tmp_path / "m")
    with pytest.raises(ValueError, match="is also an input"):
        merge_datasets([tmp_path / "a"], tmp_path / "a")
    with pytest.raises(ValueError, match="at least one"):
        merge_datasets([], tmp_path / "m")
    assert not IndexedDataset.exists(tmp_path / "m")
    b = IndexedDatasetBuilder(tmp_path / "m", np.uint16)
    with pytest.raises(IndexedDatasetError, match="differs from the output's uint16"):
        b.add_index(tmp_path / "b")
    b.add_sequence([1])
    with pytest.raises(ValueError, match="inside an open document"):
        b.add_index(tmp_path / "a")
    b.abort()
    assert _outputs(tmp_path) == ["a.bin", "a.idx", "b.bin", "b.idx"]


# ------------------------------------------------------------------------------------------------
# megatron-core, both directions
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mcore():
    try:
        with warnings.catch_warnings():  # megatron-core warns about absent GPU extras on import
            warnings.simplefilter("ignore")
            from megatron.core.datasets import indexed_dataset
    except ImportError as e:  # requirements-dev.txt installs it; only a bare environment lacks it
        pytest.skip(f"megatron-core is not importable ({e}); pip install megatron-core")
    return indexed_dataset


def _same(ours: IndexedDataset, theirs) -> None:
    np.testing.assert_array_equal(ours.sequence_lengths, theirs.sequence_lengths)
    np.testing.assert_array_equal(ours.sequence_pointers, theirs.index.sequence_pointers)
    np.testing.assert_array_equal(ours.document_indices, theirs.document_indices)
    assert ours.dtype == theirs.index.dtype
    assert len(ours) == len(theirs)
    for i in range(len(ours)):
        a, b = ours[i], theirs[i]
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
        if len(a) > 2:
            np.testing.assert_array_equal(ours.get(i, 1, len(a) - 2), theirs.get(i, 1, len(a) - 2))


# megatron-core's builder calls numpy.array(tensor, dtype) the way numpy 2 deprecates
_MCORE_WARNINGS = pytest.mark.filterwarnings("ignore::DeprecationWarning:megatron")


@_MCORE_WARNINGS
@pytest.mark.parametrize("code", sorted(DTYPE_CODES))
def test_megatron_reads_ours_and_writes_the_same_bytes(tmp_path, mcore, code):
    import torch

    dtype = np.dtype(DTYPE_CODES[code])
    hi = 100 if dtype.itemsize == 1 else 30000
    docs = _docs(np.random.default_rng(code), 25, 0, hi)
    _write(tmp_path / "ours", dtype, docs)
    _same(IndexedDataset(tmp_path / "ours"), mcore.IndexedDataset(str(tmp_path / "ours")))

    builder = mcore.IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=dtype.type)
    for k, seqs in enumerate(docs):
        if k % 2:  # both of Megatron's ways to add a document
            builder.add_document(torch.from_numpy(np.concatenate(seqs)), [len(s) for s in seqs])
        else:
            for s in seqs:
                builder.add_item(torch.from_numpy(s))
            builder.end_document()
    builder.finalize(str(tmp_path / "theirs.idx"))
    theirs = IndexedDataset(tmp_path / "theirs")
    _same(theirs, mcore.IndexedDataset(str(tmp_path / "theirs")))
    _assert_holds(theirs, [[s.astype(dtype) for s in seqs] for seqs in docs])
    for ext in ("idx", "bin"):
        assert (tmp_path / f"ours.{ext}").read_bytes() == (tmp_path / f"theirs.{ext}").read_bytes()


@_MCORE_WARNINGS
def test_megatron_merge_matches_ours(tmp_path, mcore):
    rng = np.random.default_rng(7)
    prefixes = []
    for k in range(3):
        _write(tmp_path / f"p{k}", np.uint16, _docs(rng, 5 + 3 * k, 0, 50000))
        prefixes.append(str(tmp_path / f"p{k}"))
    builder = mcore.IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=np.uint16)
    for p in prefixes:
        builder.add_index(p)
    builder.finalize(str(tmp_path / "theirs.idx"))
    merge_datasets(prefixes, tmp_path / "ours")
    _same(IndexedDataset(tmp_path / "theirs"), mcore.IndexedDataset(str(tmp_path / "ours")))
    for ext in ("idx", "bin"):
        assert (tmp_path / f"ours.{ext}").read_bytes() == (tmp_path / f"theirs.{ext}").read_bytes()


def test_megatron_empty_dataset_reads_here(tmp_path, mcore):
    mcore.IndexedDatasetBuilder(str(tmp_path / "e.bin"), dtype=np.uint16).finalize(str(tmp_path / "e.idx"))
    ds = IndexedDataset(tmp_path / "e")
    assert len(ds) == 0 and ds.num_documents == 0
    IndexedDatasetBuilder(tmp_path / "o", np.uint16).finalize()
    assert (tmp_path / "o.idx").read_bytes() == (tmp_path / "e.idx").read_bytes()


@pytest.mark.slow
def test_dataloader_spawn_worker_reads_through_pickle(tmp_path):
    import torch

    docs = _docs(np.random.default_rng(5), 40, 0, 60000)
    _write(tmp_path / "d", np.uint16, docs)
    ds = IndexedDataset(tmp_path / "d")
    loader = torch.utils.data.DataLoader(
        ds, batch_size=None, num_workers=1, multiprocessing_context="spawn",
        collate_fn=np.copy,  # leave the arrays numpy (the default collate would make tensors)
    )
    flat = [s for seqs in docs for s in seqs]
    got = list(loader)
    assert len(got) == len(flat)
    for a, b in zip(got, flat):
        np.testing.assert_array_equal(a, b)

"""GPT sample dataset: C++ sample index vs numpy and megatron-core, full samples vs megatron-core's
GPTDataset, multi-epoch, on-disk caching, empty splits, the rank-0-builds protocol."""
from __future__ import annotations

import glob
import importlib.util
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from megapre.data import gpt_helpers
from megapre.data.gpt_dataset import GPTDataset, GPTDatasetConfig, causal_lm_sample
from megapre.data.index_cache import CacheConfig, FileLock, IndexCache
from megapre.data.indexed import IndexedDataset, IndexedDatasetBuilder

REPO = Path(__file__).resolve().parents[2]
EOD = 0


# --- test corpora ------------------------------------------------------------------------------

def write_indexed(prefix: Path, docs: list[np.ndarray]) -> str:
    """Write P.bin/P.idx (uint16 tokens, one sequence per document) with megapre's writer."""
    with IndexedDatasetBuilder(prefix, np.uint16) as builder:
        for d in docs:
            builder.add_document(d)
        builder.finalize()
    return str(prefix)


def open_indexed(prefix: str) -> IndexedDataset:
    return IndexedDataset(prefix)


def random_docs(rng: np.random.Generator, n: int, max_len: int = 40, empty_every: int = 0) -> list[np.ndarray]:
    """Documents of random tokens 1..999 ending in EOD (some empty when empty_every)."""
    docs = []
    for i in range(n):
        if empty_every and i % empty_every == 3:
            docs.append(np.zeros(0, dtype=np.uint16))
            continue
        body = rng.integers(1, 1000, size=int(rng.integers(1, max_len)))
        docs.append(np.append(body, EOD).astype(np.uint16))
    return docs


@pytest.fixture
def corpus(tmp_path):
    prefix = write_indexed(tmp_path / "corpus_text_document", random_docs(np.random.default_rng(0), 120, empty_every=17))
    return open_indexed(prefix)


def config(tmp_path, **kw) -> GPTDatasetConfig:
    kw.setdefault("cache", CacheConfig(cache_dir=str(tmp_path / "cache")))
    kw.setdefault("seq_length", 16)
    return GPTDatasetConfig(**kw)


def megatron_helpers():
    """megatron-core's compiled helpers_cpp, loaded without importing all of megatron.core."""
    spec = importlib.util.find_spec("megatron")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("megatron-core is not installed (pip install megatron-core)")
    found = []
    for root in spec.submodule_search_locations:
        found += glob.glob(os.path.join(root, "core", "datasets", "helpers_cpp*.so"))
    if not found:
        pytest.skip("megatron-core's wheel has no compiled helpers_cpp")
    loader = importlib.util.spec_from_file_location("helpers_cpp", found[0])
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return module


def stream_of(indexed, document_index) -> np.ndarray:
    return np.concatenate([indexed.get(int(d)) for d in document_index]).astype(np.int64)


# --- the sample index ---------------------------------------------------------------------------

def test_helpers_are_compiled():
    assert gpt_helpers.compiled() is not None, "megapre._C.data is not built (python setup.py build_ext --inplace)"


@pytest.mark.parametrize("seq_length", [2, 7, 64, 1000])
def test_sample_idx_matches_reference_and_megatron(seq_length):
    helpers = megatron_helpers()
    rng = np.random.default_rng(seq_length)
    sizes = rng.integers(0, 300, size=5000).astype(np.int32)
    sizes[::11] = 0  # empty documents must be skipped the same way
    doc_idx = rng.permutation(np.tile(np.arange(5000, dtype=np.int32), 2))
    ours = gpt_helpers.build_sample_idx(sizes, doc_idx, seq_length)
    total = int(sizes.sum()) * 2
    theirs = helpers.build_sample_idx_int64(sizes, doc_idx, seq_length, 2, total // 2, True, 1)
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(ours, gpt_helpers.sample_idx_reference(sizes, doc_idx, seq_length))
    np.testing.assert_array_equal(ours, gpt_helpers.build_sample_idx(sizes, doc_idx.astype(np.int64), seq_length))
    assert ours.dtype == np.int64 and ours.shape == ((total - 1) // seq_length + 1, 2)


def test_sample_idx_rejects_bad_input():
    sizes = np.array([5, 5], dtype=np.int32)
    with pytest.raises(ValueError, match=r"doc_idx\[1\] = 7"):
        gpt_helpers.build_sample_idx(sizes, np.array([0, 7], dtype=np.int32), 4)
    with pytest.raises(ValueError, match="seq_length"):
        gpt_helpers.build_sample_idx(sizes, np.array([0, 1], dtype=np.int32), 0)
    with pytest.raises(ValueError, match="int32 or int64"):
        gpt_helpers.compiled().build_sample_idx(sizes, np.array([0, 1], dtype=np.int16), 4)
    # an .idx view is misaligned (arrays start at byte 34): the compiled builder refuses it and
    # the Python face copies it first
    raw = np.zeros(12, dtype=np.uint8)
    raw[2:10] = np.frombuffer(sizes.tobytes(), dtype=np.uint8)
    view = np.frombuffer(raw, dtype=np.int32, count=2, offset=2)
    with pytest.raises(ValueError, match="aligned"):
        gpt_helpers.compiled().build_sample_idx(view, np.array([0, 1], dtype=np.int32), 4)
    np.testing.assert_array_equal(gpt_helpers.build_sample_idx(view, np.array([0, 1], dtype=np.int32), 4),
                                  [[0, 0], [0, 4], [1, 3]])


# --- full samples -------------------------------------------------------------------------------

def test_samples_are_windows_of_the_shuffled_stream(tmp_path, corpus):
    ds = GPTDataset(corpus, "train", (0, 100), None, config(tmp_path))
    stream = stream_of(corpus, ds.document_index)
    assert len(ds) == (len(stream) - 1) // 16
    assert sorted(ds.shuffle_index.tolist()) == list(range(len(ds)))
    for i in range(len(ds)):
        k = int(ds.shuffle_index[i])
        window = stream[k * 16: k * 16 + 17]
        item = ds[i]
        np.testing.assert_array_equal(item["tokens"], window[:-1])
        np.testing.assert_array_equal(item["labels"], window[1:])
        assert item["tokens"].dtype == np.int64 and item["loss_mask"].dtype == np.float32
    assert set(ds.document_index.tolist()) == set(range(100))


def test_multi_epoch(tmp_path, corpus):
    one_epoch = len(GPTDataset(corpus, "train", (0, 30), None, config(tmp_path)))
    for want in (one_epoch + 1, 2 * one_epoch, 5 * one_epoch + 3):
        ds = GPTDataset(corpus, "train", (0, 30), want, config(tmp_path))
        assert len(ds) >= want
        counts = np.bincount(np.asarray(ds.document_index), minlength=30)
        epochs = len(ds.document_index) // 30
        assert epochs >= 2 and (counts == epochs).all()
        stream = stream_of(corpus, ds.document_index)
        for i in (0, want // 2, want - 1):
            k = int(ds.shuffle_index[i])
            np.testing.assert_array_equal(ds[i]["labels"], stream[k * 16 + 1: k * 16 + 17])


def test_matches_megatron_gpt_dataset(tmp_path, corpus):
    """Same seed and documents: megatron-core's GPTDataset yields identical items (multi-epoch,
    separate last epoch, EOD loss masking, position resets)."""
    pytest.importorskip("megatron.core.datasets.gpt_dataset", reason="megatron-core is not installed")
    from megatron.core.datasets.gpt_dataset import GPTDataset as MGPTDataset
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig as MConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MIndexed
    from megatron.core.datasets.utils import Split

    class Tok:
        eod = EOD
        vocab_size = 1000
        unique_identifiers = {"class": "Tok"}

        @property
        def pad(self):
            raise NotImplementedError

    m_indexed = MIndexed(corpus.path_prefix)
    ours_cfg = config(tmp_path, seed=7, eod_token=EOD, eod_mask_loss=True, reset_position_ids=True)
    one_epoch = len(GPTDataset(corpus, "train", (10, 110), None, ours_cfg))
    for want in (one_epoch // 2, int(2.3 * one_epoch), int(2.9 * one_epoch)):  # separate last epoch: yes, no
        theirs = MGPTDataset(
            m_indexed, corpus.path_prefix, np.arange(10, 110, dtype=np.int32), want, Split.train,
            MConfig(random_seed=7, sequence_length=16, tokenizer=Tok(), reset_position_ids=True,
                    reset_attention_mask=False, eod_mask_loss=True, create_attention_mask=False),
        )
        ours = GPTDataset(corpus, "train", (10, 110), want, ours_cfg)
        np.testing.assert_array_equal(ours.document_index, theirs.document_index)
        np.testing.assert_array_equal(ours.sample_index, theirs.sample_index)
        np.testing.assert_array_equal(ours.shuffle_index, theirs.shuffle_index)
        assert len(ours) == len(theirs)
        for i in range(0, len(ours), 3):
            a, b = ours[i], theirs[i]
            for key in ("tokens", "labels", "loss_mask", "position_ids"):
                np.testing.assert_array_equal(a[key], b[key].numpy(), err_msg=f"{key} of sample {i}")


def test_loss_mask_positions_and_attention_mask():
    text = np.array([5, 6, EOD, 7, 8, 9, EOD, EOD, 4, 3], dtype=np.int64)
    cfg = GPTDatasetConfig(seq_length=9, eod_token=EOD, eod_mask_loss=True, reset_position_ids=True,
                           reset_attention_mask=True)
    s = causal_lm_sample(text, cfg)
    np.testing.assert_array_equal(s["tokens"], text[:-1])
    np.testing.assert_array_equal(s["labels"], text[1:])
    np.testing.assert_array_equal(s["loss_mask"], [1, 1, 0, 1, 1, 1, 0, 0, 1])
    np.testing.assert_array_equal(s["position_ids"], [0, 1, 2, 0, 1, 2, 3, 0, 0])
    mask = s["attention_mask"][0]  # True = masked
    segment = np.array([0, 0, 0, 1, 1, 1, 1, 2, 3])
    allowed = (np.arange(9)[None, :] <= np.arange(9)[:, None]) & (segment[:, None] == segment[None, :])
    np.testing.assert_array_equal(mask, ~allowed)
    plain = causal_lm_sample(text, GPTDatasetConfig(seq_length=9))
    assert set(plain) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert plain["loss_mask"].all() and (plain["position_ids"] == np.arange(9)).all()
    with pytest.raises(ValueError, match="eod_token"):
        GPTDatasetConfig(seq_length=8, eod_mask_loss=True)


# --- errors -------------------------------------------------------------------------------------

def test_empty_split_is_a_clear_error(tmp_path, corpus):
    with pytest.raises(ValueError, match=r"valid split of .*corpus_text_document is empty"):
        GPTDataset(corpus, "valid", (50, 50), 10, config(tmp_path))
    with pytest.raises(ValueError, match=r"test split .* has 0 tokens"):
        GPTDataset(corpus, "test", (3, 4), 10, config(tmp_path))  # document 3 is empty
    with pytest.raises(ValueError, match="needs 1001"):
        GPTDataset(corpus, "train", (0, 2), None, config(tmp_path, seq_length=1000))
    with pytest.raises(ValueError, match="outside"):
        GPTDataset(corpus, "train", (0, 500), None, config(tmp_path))


# --- caching ------------------------------------------------------------------------------------

def test_cache_hit_and_key_changes(tmp_path, corpus):
    first = GPTDataset(corpus, "train", (0, 100), 300, config(tmp_path))
    assert first.cache_status == "built"
    again = GPTDataset(corpus, "train", (0, 100), 300, config(tmp_path))
    assert again.cache_status == "loaded" and again.cache_key == first.cache_key
    assert isinstance(again.sample_index, np.memmap)
    for name in ("document_index", "sample_index", "shuffle_index"):
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
    cache_files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert [n for n in cache_files if n.startswith(".")] == []  # no temporaries left
    assert f"{first.cache_key}-GPTDataset-description.json" in cache_files
    keys = {first.cache_key}
    for changed in (dict(seed=1), dict(seq_length=17)):
        keys.add(GPTDataset(corpus, "train", (0, 100), 300, config(tmp_path, **changed)).cache_key)
    keys.add(GPTDataset(corpus, "train", (0, 100), 301, config(tmp_path)).cache_key)
    keys.add(GPTDataset(corpus, "train", (0, 99), 300, config(tmp_path)).cache_key)
    # the loss/position options do not change the indices, so they share the entry
    assert GPTDataset(corpus, "train", (0, 100), 300, config(tmp_path, eod_token=EOD, eod_mask_loss=True)).cache_key \
        == first.cache_key
    docs = random_docs(np.random.default_rng(0), 120, empty_every=17)
    docs[5] = docs[5][:-1]  # same files, one token less: new content -> new key
    other = open_indexed(write_indexed(tmp_path / "corpus_text_document", docs))
    keys.add(GPTDataset(other, "train", (0, 100), 300, config(tmp_path)).cache_key)
    assert len(keys) == 6


def test_default_cache_dir_is_beside_the_data(tmp_path, corpus):
    ds = GPTDataset(corpus, "train", (0, 100), None, GPTDatasetConfig(seq_length=16))
    assert Path(ds.cache_paths["sample_index"]).parent == tmp_path / "index-cache"
    mem = GPTDataset(corpus, "train", (0, 100), None, GPTDatasetConfig(seq_length=16, cache=CacheConfig(enabled=False)))
    assert mem.cache_status == "memory" and mem.cache_paths is None
    np.testing.assert_array_equal(mem.shuffle_index, ds.shuffle_index)


def test_pickle_remaps_the_cache(tmp_path, corpus):
    ds = GPTDataset(corpus, "train", (0, 100), None, config(tmp_path))
    blob = pickle.dumps(ds)
    assert len(blob) < 20_000 or not isinstance(ds.sample_index, np.memmap)
    clone = pickle.loads(blob)
    for i in (0, 5, len(ds) - 1):
        np.testing.assert_array_equal(clone[i]["tokens"], ds[i]["tokens"])


def test_waits_for_a_builder_then_times_out_clearly(tmp_path, corpus):
    cfg = config(tmp_path, cache=CacheConfig(cache_dir=str(tmp_path / "cache"), wait_timeout_s=0.3))
    probe = GPTDataset(corpus, "train", (0, 100), None, GPTDatasetConfig(seq_length=16, cache=CacheConfig(enabled=False)))
    entry = IndexCache(tmp_path / "cache", "GPTDataset", probe.description, ("document_index",))
    (tmp_path / "cache").mkdir()
    with FileLock(entry.lock_path, 1.0, "test"):
        with pytest.raises(TimeoutError, match=r"waited 0 s for .*\.lock while another process \(pid"):
            GPTDataset(corpus, "train", (0, 100), None, cfg)
    assert GPTDataset(corpus, "train", (0, 100), None, cfg).cache_status == "built"


# --- rank 0 builds, the others wait (2 gloo processes) -------------------------------------------

WORKER = textwrap.dedent("""
    import os, sys, numpy as np, torch.distributed as dist
    sys.path.insert(0, os.environ["REPO"]); sys.path.insert(0, os.environ["TESTS"])
    from test_gpt_dataset import open_indexed
    from megapre.data import gpt_dataset
    from megapre.data.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megapre.data.index_cache import CacheConfig
    dist.init_process_group("gloo", init_method="file://" + os.environ["STORE"],
                            rank=int(os.environ["RANK"]), world_size=2)
    rank = dist.get_rank()
    cfg = GPTDatasetConfig(seq_length=16, cache=CacheConfig(cache_dir=os.environ["CACHE"]))
    corpus = open_indexed(os.environ["PREFIX"])
    ds = GPTDataset(corpus, "train", (0, 100), 500, cfg)
    np.save(os.environ["OUT"] + f"/rank{rank}.npy", np.asarray(ds.shuffle_index))
    print(f"rank{rank}", ds.cache_status, flush=True)
    # node-local caches: each "node" (LOCAL_RANK 0 in both processes) builds into its own directory
    os.environ["LOCAL_RANK"] = "0"
    local = GPTDataset(corpus, "train", (0, 100), 500, GPTDatasetConfig(
        seq_length=16, cache=CacheConfig(cache_dir=os.environ["CACHE"] + f"-node{rank}", node_local=True)))
    print(f"rank{rank} node-local", local.cache_status, flush=True)
    if rank == 0:  # a failing build must raise on every rank, not hang the others
        gpt_dataset.build_gpt_indices = lambda *a, **k: (_ for _ in ()).throw(OSError("disk full"))
    try:
        GPTDataset(corpus, "train", (0, 100), 777, cfg)
    except (OSError, RuntimeError) as e:
        print(f"rank{rank} error", e, flush=True)
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_rank0_builds_and_rank1_waits(tmp_path, corpus):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, REPO=str(REPO), TESTS=str(Path(__file__).resolve().parent), STORE=str(tmp_path / "store"),
               CACHE=str(tmp_path / "cache"), PREFIX=corpus.path_prefix, OUT=str(tmp_path), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(script)], env=dict(env, RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert "rank0 built" in outs[0] and "rank1 loaded" in outs[1], outs
    assert "rank0 node-local built" in outs[0] and "rank1 node-local built" in outs[1], outs
    assert "rank0 error disk full" in outs[0], outs
    assert "rank1 error rank 0 failed to build the GPTDataset indices: OSError: disk full" in outs[1], outs
    np.testing.assert_array_equal(np.load(tmp_path / "rank0.npy"), np.load(tmp_path / "rank1.npy"))


def test_data_loader_workers_read_the_cached_indices(tmp_path, corpus):
    from megapre.data.sampler import build_data_loader

    ds = GPTDataset(corpus, "train", (0, 100), 64, config(tmp_path))
    loader = build_data_loader(ds, consumed_samples=16, micro_batch_size=4, global_batch_size=8,
                               data_parallel_rank=1, data_parallel_size=2, num_workers=2)
    batches = list(loader)
    assert len(batches) == (len(ds) // 8 * 8 - 16) // 8
    for step, batch in enumerate(batches):
        first = 16 + step * 8 + 4  # rank 1 takes the second half of each micro step
        expect = np.stack([ds[i]["tokens"] for i in range(first, first + 4)])
        np.testing.assert_array_equal(batch["tokens"].numpy(), expect)
        assert batch["loss_mask"].dtype.is_floating_point and batch["position_ids"].shape == (4, 16)


def test_split_of_sentence_split_data_keeps_documents_whole(tmp_path):
    """With several sequences per document (--split-sentences data) a split takes whole documents;
    the samples run over their sequences (Megatron's GPT unit)."""
    rng = np.random.default_rng(3)
    prefix = tmp_path / "sentences"
    with IndexedDatasetBuilder(prefix, np.uint16) as builder:
        for _ in range(20):
            parts = rng.integers(1, 9, size=3)
            builder.add_document(rng.integers(1, 999, size=int(parts.sum())), parts.tolist())
        builder.finalize()
    corpus = IndexedDataset(prefix)
    ds = GPTDataset(corpus, "valid", (5, 12), None, config(tmp_path, seq_length=4))
    assert set(np.asarray(ds.document_index).tolist()) == set(range(15, 36))
    stream = stream_of(corpus, ds.document_index)
    k = int(ds.shuffle_index[2])
    np.testing.assert_array_equal(ds[2]["tokens"], stream[4 * k: 4 * k + 4])


def _build_in_child(prefix: str, cache_dir: str, queue) -> None:
    import time

    from megapre.data import gpt_dataset

    real = gpt_dataset.build_gpt_indices

    def slow(*args, **kwargs):  # hold the lock long enough for the other process to queue on it
        time.sleep(0.5)
        return real(*args, **kwargs)

    gpt_dataset.build_gpt_indices = slow
    ds = GPTDataset(open_indexed(prefix), "train", (0, 100), 200, GPTDatasetConfig(
        seq_length=16, cache=CacheConfig(cache_dir=cache_dir)))
    queue.put((ds.cache_status, np.asarray(ds.shuffle_index).tolist()))


def test_independent_processes_build_once(tmp_path, corpus):
    """Without torch.distributed, the file lock lets one process build while the other waits."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(corpus.path_prefix, str(tmp_path / "cache"), queue))
             for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sorted(status for status, _ in results) == ["built", "loaded"]
    assert results[0][1] == results[1][1]

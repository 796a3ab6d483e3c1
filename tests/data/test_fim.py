"""Fill-in-the-middle samples (megapre/data/fim.py, Megatron's --fim-data) over GPT-2 tokens of
tinyshakespeare: the same sample for the same seed in any order or process, a PSM/SPM sample is
its document's text rearranged around the sentinels, rate 0 is the plain GPT sample, lengths stay
seq_length + 1, the rates hold over many draws; the sentinels are appended to GPT-2's vocabulary
(model and checkpoint record them); the flags are checked; a CPU run trains with finite loss."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED_DATA
from megapre.cli.flags import parse_config
from megapre.data.fim import FIMConfig, FIMDataset, FIMTransform, resolve_token_ids
from megapre.data.gpt_dataset import GPTDataset, GPTDatasetConfig
from megapre.data.index_cache import CacheConfig
from megapre.data.indexed import IndexedDataset, IndexedDatasetBuilder
from megapre.data.tokenizers import TokenizerConfig, build_tokenizer
from megapre.errors import ConfigError
from megapre.train.args import validate

ROOT = Path(__file__).resolve().parents[2]
GPT2 = SHARED_DATA / "gpt2"
TEXT = SHARED_DATA / "tinyshakespeare.txt"
SENTINELS = FIMConfig().sentinels()
SEQ = 64
MEGATRON_FIM = sorted((ROOT / "tests" / "fixtures" / "megatron_configs" / "gpt").glob("*fim*.yaml"))


def _need_data() -> None:
    for path in (GPT2 / "vocab.json", GPT2 / "merges.txt", TEXT):
        if not path.exists():
            pytest.skip(f"needs the shared test data file {path}")


def gpt2(added: tuple[str, ...] = SENTINELS):
    _need_data()
    return build_tokenizer(TokenizerConfig("GPT2BPETokenizer", vocab_file=str(GPT2 / "vocab.json"),
                                           merge_file=str(GPT2 / "merges.txt"),
                                           added_tokens=added))


@pytest.fixture(scope="module")
def tok():
    return gpt2()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tok) -> str:
    """Documents of six tinyshakespeare speeches each, GPT-2 ids, each ending in EOD."""
    speeches = TEXT.read_text(encoding="utf-8").split("\n\n")[:600]
    docs = ["\n\n".join(speeches[i:i + 6]) for i in range(0, len(speeches), 6)]
    prefix = tmp_path_factory.mktemp("fim") / "shakespeare_text_document"
    with IndexedDatasetBuilder(prefix, np.uint16) as builder:
        for ids in tok.encode_batch(docs):
            builder.add_document(np.array(ids + [tok.eod], dtype=np.uint16))
    return str(prefix)


def gpt_dataset(corpus: str, tmp_path: Path, num_samples: int = 200) -> GPTDataset:
    indexed = IndexedDataset(corpus)
    config = GPTDatasetConfig(seq_length=SEQ, seed=1234,
                              cache=CacheConfig(cache_dir=str(tmp_path / "cache")))
    return GPTDataset(indexed, "train", (0, indexed.num_documents), num_samples, config)


def fim_dataset(corpus: str, tmp_path: Path, tok, **kw) -> FIMDataset:
    return FIMDataset(gpt_dataset(corpus, tmp_path), FIMTransform(tok, FIMConfig(**kw)))


def parts(tok, ids: np.ndarray) -> tuple[str, str, str, str]:
    """(order, prefix, middle, suffix) of one transformed piece; SPM's prefix+middle is one
    run of text, given whole as its middle with an empty prefix."""
    pre, mid, suf, _ = (tok.token_ids[s] for s in SENTINELS)
    ids = list(ids)
    if ids[:2] == [pre, suf]:
        m = ids.index(mid)
        return "SPM", "", tok.decode(ids[m + 1:]), tok.decode(ids[2:m])
    assert ids[0] == pre, tok.decode(ids)
    s, m = ids.index(suf), ids.index(mid)
    return "PSM", tok.decode(ids[1:s]), tok.decode(ids[m + 1:]), tok.decode(ids[s + 1:m])


# --- the tokenizer ----------------------------------------------------------------------------

def test_sentinels_are_appended_to_gpt2_and_recorded(tok):
    base = gpt2(added=())
    assert base.vocab_size == 50257
    assert tok.vocab_size == 50261 and tok.eod == base.eod == 50256
    assert tok.token_ids == {s: 50257 + i for i, s in enumerate(SENTINELS)}
    assert tok.encode("<fim_prefix>x") == base.encode("<fim_prefix>x")  # text never forges one
    assert tok.decode([50257, *base.encode(" hi"), 50260]) == "<fim_prefix> hi<fim_pad>"
    record = tok.describe()
    assert record["added_tokens"] == tok.token_ids and record["vocab_size"] == 50261
    assert record["config"]["added_tokens"] == list(SENTINELS)
    assert tok.fingerprint() != base.fingerprint()
    assert pickle.loads(pickle.dumps(tok)).fingerprint() == tok.fingerprint()
    assert "added_tokens" not in base.describe()["config"]  # plain records are as before


def test_the_model_vocabulary_counts_the_sentinels(corpus):
    cfg = parse_config(_flags(corpus, Path("/tmp/unused")))
    tokenizer = build_tokenizer(cfg.tokenizer_config())
    model = cfg.transformer_config(tokenizer.vocab_size)
    assert model.vocab_size == 50261 and model.padded_vocab_size(1) % 128 == 0
    assert model.padded_vocab_size(1) >= 50261


def test_a_tokenizer_without_text_is_refused(tok):
    null = build_tokenizer(TokenizerConfig("NullTokenizer", vocab_size=100, added_tokens=SENTINELS))
    with pytest.raises(ConfigError, match="^--fim-data: NullTokenizer"):
        resolve_token_ids(null, FIMConfig())
    with pytest.raises(ConfigError, match="^--fim-split-sample ROMEO: not a single token"):
        resolve_token_ids(tok, FIMConfig(split_sample="ROMEO", fragment_rate=0.5))


# --- the samples ------------------------------------------------------------------------------

def test_rate_zero_is_the_plain_gpt_sample(corpus, tmp_path, tok):
    fim = fim_dataset(corpus, tmp_path, tok, rate=0.0)
    plain = fim.dataset
    for idx in range(0, 200, 7):
        assert np.array_equal(fim.tokens(idx), plain.tokens(idx))
        for key, value in plain[idx].items():
            assert np.array_equal(fim[idx][key], value), key


def test_samples_are_deterministic_for_a_seed(corpus, tmp_path, tok):
    fim = fim_dataset(corpus, tmp_path, tok)
    forward = [fim.tokens(i) for i in range(40)]
    backward = [fim.tokens(i) for i in reversed(range(40))][::-1]
    again = pickle.loads(pickle.dumps(fim))  # as a DataLoader worker gets it
    assert all(np.array_equal(a, b) for a, b in zip(forward, backward))
    assert all(np.array_equal(a, again.tokens(i)) for i, a in enumerate(forward))
    other = fim_dataset(corpus, tmp_path, tok, seed=99)
    assert any(not np.array_equal(a, other.tokens(i)) for i, a in enumerate(forward))


def test_lengths_stay_seq_length_plus_one(corpus, tmp_path, tok):
    fim = fim_dataset(corpus, tmp_path, tok, rate=1.0)
    pad = tok.token_ids["<fim_pad>"]
    for idx in range(len(fim)):
        tokens = fim.tokens(idx)
        assert tokens.shape == (SEQ + 1,) and tokens.dtype == np.int64
        sample = fim[idx]
        assert sample["tokens"].shape == (SEQ,)
        assert not sample["loss_mask"][sample["labels"] == pad].any()


def test_a_sample_that_shrinks_is_padded_without_loss(tok):
    """Ids spelled letter by letter re-encode to fewer tokens: the sample is padded with
    <fim_pad> up to its length (Megatron's rule) and the pads carry no loss."""
    letters = np.array([tok.encode(c)[0] for c in "abcdefghijklmnopqrstuvwxyz" * 3])
    transform = FIMTransform(tok, FIMConfig(rate=1.0))
    out = transform(letters, np.random.RandomState(0))
    pad = tok.token_ids["<fim_pad>"]
    assert len(out) == len(letters) and out[-1] == pad
    kept = out[out != pad]
    assert "".join(parts(tok, kept)[1:]) == "abcdefghijklmnopqrstuvwxyz" * 3 or \
        parts(tok, kept)[0] == "SPM"


def test_rate_one_transforms_every_piece_into_its_text_rearranged(corpus, tmp_path, tok):
    fim = fim_dataset(corpus, tmp_path, tok, rate=1.0)
    pad, seen = tok.token_ids["<fim_pad>"], {"PSM": 0, "SPM": 0}
    for idx in range(len(fim)):
        original = fim.dataset.tokens(idx)
        tokens = fim.tokens(idx)
        tokens = tokens[tokens != pad]
        before = np.split(original, np.flatnonzero(original == tok.eod))
        after = np.split(tokens, np.flatnonzero(tokens == tok.eod))
        for i, (old, new) in enumerate(zip(before, after)):
            old, new = old[old != tok.eod], new[new != tok.eod]
            if len(old) == 0 or i == len(after) - 1:
                continue  # an empty piece stays empty; the sample's last one may be cut short
            assert new[0] == tok.token_ids["<fim_prefix>"]
            order, prefix, middle, suffix = parts(tok, new)
            seen[order] += 1
            assert prefix + middle + suffix == tok.decode(old)
    assert seen["PSM"] > 20 and seen["SPM"] > 20, seen


@pytest.mark.parametrize("spm_rate, order", [(0.0, "PSM"), (1.0, "SPM")])
def test_psm_and_spm_orders(tok, spm_rate, order):
    text = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind"
    transform = FIMTransform(tok, FIMConfig(spm_rate=spm_rate))
    for seed in range(30):
        out = transform.permute(np.array(tok.encode(text)), 1.0, np.random.RandomState(seed))
        got, prefix, middle, suffix = parts(tok, out)
        assert got == order and prefix + middle + suffix == text


def test_the_rates_hold_over_many_draws(tok):
    transform = FIMTransform(tok, FIMConfig(rate=0.3, spm_rate=0.7))
    piece = np.array(tok.encode("Now is the winter of our discontent"))
    rng = np.random.RandomState(0)
    outs = [transform.permute(piece, 0.3, rng) for _ in range(3000)]
    moved = [o for o in outs if o[0] == tok.token_ids["<fim_prefix>"]]
    spm = [o for o in moved if o[1] == tok.token_ids["<fim_suffix>"]]
    assert abs(len(moved) / len(outs) - 0.3) < 0.03
    assert abs(len(spm) / len(moved) - 0.7) < 0.05


def test_split_sample_transforms_each_fragment(tok):
    """--fim-split-sample: each fragment after the split token starts its own FIM sequence
    (Megatron's unit test checks the same); the split tokens stay where they were."""
    transform = FIMTransform(tok, FIMConfig(rate=1.0, split_sample="python", fragment_rate=1.0))
    split_id = transform.ids.split
    files = ["import os\nprint(os.getcwd())\n", "def f(x):\n    return x\n", "x = 1\n"]
    ids = np.array([i for f in files for i in tok.encode(f) + [split_id]][:-1])
    out = transform.piece(ids, np.random.RandomState(1))  # one document, before the length fit
    assert (out == split_id).sum() == (ids == split_id).sum() == 2
    fragments = np.split(out, np.flatnonzero(out == split_id))
    for text, fragment in zip(files, fragments):
        fragment = fragment[fragment != split_id]
        assert fragment[0] == tok.token_ids["<fim_prefix>"]
        assert parts(tok, fragment)[0] == "SPM" or "".join(parts(tok, fragment)[1:]) == text


def test_no_prefix_leaves_matching_pieces_alone(tok):
    transform = FIMTransform(tok, FIMConfig(rate=1.0, no_prefix="KING"))
    kept = np.array(tok.encode("KING RICHARD III:\nNow is the winter"))
    moved = np.array(tok.encode("GLOUCESTER:\nNow is the winter"))
    rng = np.random.RandomState(0)
    assert np.array_equal(transform.permute(kept, 1.0, rng), kept)
    assert transform.permute(moved, 1.0, rng)[0] == tok.token_ids["<fim_prefix>"]


# --- flags ------------------------------------------------------------------------------------

def _flags(corpus: str, out: Path, *extra: str) -> list[str]:
    return ["--model", "gpt", "--num-layers", "2", "--hidden-size", "32",
            "--num-attention-heads", "4", "--seq-length", str(SEQ), "--micro-batch-size", "2",
            "--global-batch-size", "4", "--train-iters", "4", "--lr", "1e-3", "--eval-iters", "0",
            "--data-path", corpus, "--split", "100,0,0", "--tokenizer-type", "GPT2BPETokenizer",
            "--vocab-file", str(GPT2 / "vocab.json"), "--merge-file", str(GPT2 / "merges.txt"),
            "--num-workers", "0", "--device", "cpu", "--data-cache-path", str(out / "cache"),
            "--fim-data", "--fim-rate", "0.9", "--fim-spm-rate", "0.5", *extra]


@pytest.mark.parametrize("extra, message", [
    (["--fim-rate", "1.5"], "--fim-rate 1.5: must be a probability in [0, 1]"),
    (["--fim-spm-rate", "-0.1"], "--fim-spm-rate -0.1: must be a probability in [0, 1]"),
    (["--fim-split-sample", "python"], "--fim-split-sample python needs --fim-fragment-rate"),
    (["--fim-split-sample", "python", "--fim-fragment-rate", "2"],
     "--fim-fragment-rate 2.0: must be a probability in [0, 1]"),
    (["--model", "bert"], "--fim-data is GPT-only"),
])
def test_bad_fim_flags_are_one_line_config_errors(tmp_path, extra, message):
    cfg = parse_config(_flags(str(tmp_path / "c"), tmp_path, *extra))
    with pytest.raises(ConfigError) as e:
        validate(cfg, 1)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_fim_with_mock_data_is_refused(tmp_path):
    argv = [a for a in _flags("x", tmp_path) if a not in ("--data-path", "x")] + ["--mock-data"]
    with pytest.raises(ConfigError, match="^--fim-data with --mock-data"):
        validate(parse_config(argv), 1)


def test_the_tokenizer_gets_the_sentinels_only_with_fim_data(tmp_path):
    cfg = parse_config(_flags("x", tmp_path, "--fim-prefix-token", "<PRE>"))
    assert cfg.tokenizer_config().added_tokens == ("<PRE>", *SENTINELS[1:])
    plain = [a for a in _flags("x", tmp_path) if a != "--fim-data"]
    assert parse_config(plain).tokenizer_config().added_tokens == ()


@pytest.mark.parametrize("path", MEGATRON_FIM, ids=lambda p: p.stem)
def test_megatron_fim_configs_parse(path, monkeypatch):
    for name in ("DATA_PATH", "CHECKPOINT_SAVE_PATH", "CHECKPOINT_LOAD_PATH", "TENSORBOARD_PATH",
                 "DATA_CACHE_PATH"):
        monkeypatch.setenv(name, f"/data/{name.lower()}")
    # as pretrain_gpt.py runs it: GPT-2's tokenizer unless the config names one
    cfg = parse_config(["--config", str(path)],
                       unset_defaults={"data.tokenizer_type": "GPT2BPETokenizer"})
    validate(cfg, 8, vocab_size=50304)
    d = cfg.data
    assert d.fim_data and d.fim_rate == 0.5 and d.fim_spm_rate == 0.5
    assert cfg.tokenizer_config().added_tokens == SENTINELS


# --- training ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_fim_pretraining_has_finite_loss_and_records_the_sentinels(corpus, tmp_path):
    from megapre.train.args import from_dict
    from megapre.train.checkpoint import find_latest, read_config, read_meta

    metrics, save = tmp_path / "metrics.jsonl", tmp_path / "ckpt"
    argv = _flags(corpus, tmp_path, "--log-interval", "1", "--metrics-path", str(metrics),
                  "--save", str(save), "--save-interval", "4")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "megapre.pretrain", *argv], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [json.loads(r)["loss"] for r in metrics.read_text().splitlines()
              if "split" not in json.loads(r)]
    assert len(losses) == 4 and all(np.isfinite(losses)), losses
    path = find_latest(save)
    meta = read_meta(path)
    assert meta["tokenizer"]["added_tokens"] == {s: 50257 + i for i, s in enumerate(SENTINELS)}
    assert meta["model_config"]["vocab_size"] == 50261
    # generate/evaluate rebuild the tokenizer from the saved config: the same one
    again = build_tokenizer(from_dict(read_config(path)).tokenizer_config())
    assert again.fingerprint() == meta["tokenizer"]["fingerprint"]


def test_fim_with_null_tokenizer_is_refused_by_validate(tmp_path):
    argv = _flags("x", tmp_path) + ["--tokenizer-type", "NullTokenizer", "--vocab-size", "100"]
    argv = [a for i, a in enumerate(argv) if a not in ("--vocab-file", "--merge-file")
            and argv[i - 1] not in ("--vocab-file", "--merge-file")]
    with pytest.raises(ConfigError, match="^--fim-data: NullTokenizer has no text"):
        validate(parse_config(argv), 1)


def test_a_vocabulary_that_has_the_sentinels_keeps_its_ids(tmp_path):
    """A tokenizer that already spells the sentinels (as StarCoder's does) gets nothing appended:
    FIM uses its ids, and the tokenizer's fingerprint is unchanged."""
    hf = pytest.importorskip("tokenizers")
    model = hf.Tokenizer(hf.models.BPE())
    model.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = hf.decoders.ByteLevel()
    trainer = hf.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", *SENTINELS],
                                     initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet())
    model.train_from_iterator(["def f(x):\n    return x + 1\n"] * 50, trainer=trainer)
    model.save(str(tmp_path / "tokenizer.json"))
    config = TokenizerConfig("HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "tokenizer.json"))
    plain = build_tokenizer(config)
    fim = build_tokenizer(TokenizerConfig(**{**config.__dict__, "added_tokens": SENTINELS}))
    assert fim.vocab_size == plain.vocab_size and fim.added == {}
    assert fim.fingerprint() == plain.fingerprint()
    ids = resolve_token_ids(fim, FIMConfig())
    assert [ids.prefix, ids.middle, ids.suffix, ids.pad] == [fim.token_ids[s] for s in SENTINELS]
    assert [plain.decode([i]) for i in (ids.prefix, ids.pad)] == ["<fim_prefix>", "<fim_pad>"]

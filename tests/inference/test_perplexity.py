"""Sliding-window perplexity (megapre/inference/perplexity.py, `megapre.evaluate --text-file`):
the windows score every token once with the promised context, stride = seq-length is the
pretraining loss of the same tokens, a smaller stride equals a direct pass per window, every
layout (TP2, PP2, DP2, TP2 x PP2; gloo) gives the one-process numbers, and the CLI end to end on
WikiText-2 with GPT-2's BPE, plus its bad flags."""
from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch

from conftest import COUNTING_VOCAB
from megapre.errors import ConfigError
from megapre.inference.logprobs import TokenScorer
from megapre.inference.perplexity import (Window, batch_windows, count_words, sliding_windows,
                                          stream_perplexity, window_tensors)
from tiny_checkpoints import counting_checkpoint, gpt2_checkpoint, wikitext_slice

pytest.importorskip("megapre.train.checkpoint", reason="checkpoints are not in this tree")


# -- windows ---------------------------------------------------------------------------------------
def _check_windows(n: int, seq: int, stride: int) -> list[Window]:
    windows = sliding_windows(n, seq, stride)
    scored = []  # stream positions of the scored targets
    for w in windows:
        assert 1 <= w.scored <= w.length <= seq and w.start >= 0
        assert w.start + w.length <= n - 1  # the last target exists
        for i in range(w.start + w.length - w.scored, w.start + w.length):
            scored.append(i + 1)
            if i + 1 > seq:  # once the first window is full: at least seq - stride context
                assert i - w.start + 1 >= seq - stride + 1
    assert scored == list(range(1, n))  # every target once, in order
    return windows


@pytest.mark.parametrize("n,seq,stride", [(2, 8, 8), (7, 8, 8), (9, 8, 8), (10, 8, 8),
                                          (100, 8, 8), (100, 8, 3), (100, 8, 1), (101, 16, 5),
                                          (17, 16, 16), (50, 16, 7)])
def test_windows_score_every_token_once_with_context(n, seq, stride):
    windows = _check_windows(n, seq, stride)
    assert windows[0] == Window(0, min(seq, n - 1), min(seq, n - 1))  # first: all its targets
    if n - 1 > seq:
        assert all(w.length == seq for w in windows)  # the last (partial) one too: full context
        assert all(w.scored == stride for w in windows[1:-1])
        assert windows[-1].scored == (n - 1 - seq - 1) % stride + 1
        assert windows[-1].start + seq == n - 1


def test_first_last_and_tiny_windows():
    assert sliding_windows(20, 8, 8) == [Window(0, 8, 8), Window(8, 8, 8), Window(11, 8, 3)]
    assert sliding_windows(13, 8, 4) == [Window(0, 8, 8), Window(4, 8, 4)]
    assert sliding_windows(5, 8, 3) == [Window(0, 4, 4)]  # shorter than one window
    assert sliding_windows(1, 8, 8) == [] and sliding_windows(0, 8, 8) == []
    ids = torch.arange(100, 120)
    x, y, m = window_tensors(ids, Window(11, 8, 3))
    assert x.tolist() == list(range(111, 119)) and y.tolist() == list(range(112, 120))
    assert m.tolist() == [False] * 5 + [True] * 3
    inputs, targets, mask = batch_windows(ids, [Window(0, 4, 4), Window(2, 6, 2)])
    assert inputs.tolist() == [[100, 101, 102, 103, 0, 0], list(range(102, 108))]
    assert mask.sum(1).tolist() == [4, 2] and not mask[0, 4:].any()
    assert targets[1].tolist() == list(range(103, 109))
    assert count_words(" a  b\nc\t d \n") == 4


@pytest.mark.parametrize("stride", [0, -1, 9])
def test_bad_stride(stride):
    with pytest.raises(ConfigError, match="--stride"):
        sliding_windows(100, 8, stride)


@pytest.mark.parametrize("seq,stride", [(4, 4), (8, 3), (8, 1), (16, 9)])
def test_windows_equal_lm_eval_rolling_windows(seq, stride):
    """The harness's rolling windows with context_len = seq - stride + 1 (prefix token first)."""
    utils = pytest.importorskip("lm_eval.utils")
    tokens = list(range(1000, 1037))
    ids = torch.tensor([7] + tokens)
    theirs = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(
        tokens, prefix_token=7, max_seq_len=seq, context_len=seq - stride + 1)]
    ours = sliding_windows(len(ids), seq, stride)
    assert len(ours) == len(theirs)
    for w, (context, predicted) in zip(ours, theirs):
        x, y, m = window_tensors(ids, w)
        assert y[m].tolist() == predicted
        assert x.tolist() == (context + predicted)[:-1]


# -- against the model's own loss ------------------------------------------------------------------
def _runtime(seq: int = 16):
    from megapre.cli.flags import parse_config
    from megapre.train.runtime import build_runtime

    cfg = parse_config(["--model", "gpt", "--num-layers", "2", "--hidden-size", "32",
                        "--num-attention-heads", "4", "--seq-length", str(seq),
                        "--micro-batch-size", "1", "--global-batch-size", "1",
                        "--hidden-dropout", "0", "--attention-dropout", "0",
                        "--tokenizer-type", "NullTokenizer", "--vocab-size", "39",
                        "--make-vocab-size-divisible-by", "8", "--device", "cpu"])
    return build_runtime(cfg)


def _stream(n: int) -> torch.Tensor:
    return torch.randint(0, COUNTING_VOCAB, (n,), generator=torch.Generator().manual_seed(n))


def test_stride_seq_equals_the_pretraining_loss():
    """stride = seq-length: the windows are pretraining samples; score() (EvalStep, the Trainer's
    validation loss) over them gives the same token count and NLL sum."""
    from megapre.inference.scoring import score
    from megapre.train.step import EvalStep, StepConfig

    rt = _runtime()
    ids = _stream(90)
    got = stream_perplexity(TokenScorer(rt.model), ids, 16, 16, batch_size=4, words=30)
    windows = sliding_windows(len(ids), 16, 16)
    samples = []
    for w in windows:
        x, y, m = window_tensors(ids, w)
        samples.append({"tokens": x[None], "labels": y[None], "loss_mask": m[None].float()})
    want = score(rt.model, EvalStep(rt.model, StepConfig(1, 1)), iter(samples), len(samples), 1)
    assert got.tokens == want.tokens == 89 and got.windows == len(windows) == 6
    assert got.nll_sum == pytest.approx(want.lm_loss * want.tokens, rel=1e-6)
    assert got.token_ppl == pytest.approx(want.ppl, rel=1e-6)
    assert got.word_ppl == pytest.approx(math.exp(got.nll_sum / 30), rel=1e-12)


def test_small_stride_equals_a_direct_pass_per_window():
    rt = _runtime()
    gpt = rt.model.models[0]
    ids = _stream(70)
    got = stream_perplexity(TokenScorer(rt.model), ids, 16, 5, batch_size=3)
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for w in sliding_windows(len(ids), 16, 5):
            x, y, m = window_tensors(ids, w)
            loss = gpt(input_ids=x[None], labels=y[None])[0]
            nll += float(loss[m].double().sum())
            tokens += int(m.sum())
    assert got.tokens == tokens == 69 and got.words is None and got.word_ppl is None
    assert got.nll_sum == pytest.approx(nll, rel=1e-6)
    with pytest.raises(ConfigError, match="nothing to score"):
        stream_perplexity(TokenScorer(rt.model), ids[:1], 16, 16, batch_size=1)


def test_greedy_flag_is_the_argmax():
    rt = _runtime()
    gpt = rt.model.models[0]
    ids = _stream(34).view(2, 17)  # two sequences of 16 positions
    x, y = ids[:, :-1], ids[:, 1:]
    scores = TokenScorer(rt.model)(x, y, greedy=True)
    with torch.no_grad():
        logits = gpt.gathered_logits(gpt(input_ids=x))
    want = torch.log_softmax(logits.float(), -1).gather(-1, y[..., None])[..., 0]
    assert torch.allclose(scores.logprobs, want, atol=1e-5)
    assert torch.equal(scores.greedy, logits.argmax(-1) == y)
    y2 = logits.argmax(-1)  # targets that are the argmax everywhere
    assert TokenScorer(rt.model)(x, y2, greedy=True).greedy.all()


# -- the CLI: layouts --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def counting(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("counting")
    ckpt = counting_checkpoint(work)
    rng = torch.Generator().manual_seed(3)
    lines = []
    for _ in range(12):  # counting documents like the training data, ids as text
        start, k, n = (int(torch.randint(lo, hi, (1,), generator=rng))
                       for lo, hi in ((0, 39), (1, 4), (15, 40)))
        lines.append(" ".join(str((start + k * i) % 39) for i in range(n)))
    text = work / "counting.txt"
    text.write_text("\n".join(lines) + "\n")
    return {"ckpt": ckpt, "text": text, "work": work}


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from megapre.cli.evaluate import main

    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _layout_worker(rank: int, world: int, argv: list[str]) -> int:
    from megapre.cli.evaluate import main

    return main(argv)


LAYOUTS = {"tp2": (2, ["--tensor-model-parallel-size", "2"], {"tp": 2, "pp": 1, "dp": 1}),
           "pp2": (2, ["--pipeline-model-parallel-size", "2"], {"tp": 1, "pp": 2, "dp": 1}),
           "dp2": (2, [], {"tp": 1, "pp": 1, "dp": 2}),
           "tp2-pp2": (4, ["--tensor-model-parallel-size", "2",
                           "--pipeline-model-parallel-size", "2"], {"tp": 2, "pp": 2, "dp": 1})}


@pytest.mark.slow
def test_layouts_equal_one_process(counting, tmp_path, capsys):
    from megapre.parallel.testing import run_distributed

    base = ["--load", counting["ckpt"], "--text-file", str(counting["text"]), "--stride", "24",
            "--micro-batch-size", "3"]
    code, out, err = _cli([*base, "--output-json", str(tmp_path / "one.json")], capsys)
    assert code == 0, err
    one = json.loads(out.strip().splitlines()[-1])
    assert one == json.loads((tmp_path / "one.json").read_text())
    words = count_words(counting["text"].read_text())
    assert one["tokens"] == one["words"] == words  # NullTokenizer: one token per word
    assert one["windows"] >= 10 and one["stride"] == 24 and one["seq_length"] == 32
    assert one["document_start"] == "eod" and one["layout"] == {"tp": 1, "pp": 1, "dp": 1}
    assert one["token_ppl"] < 39  # trained: better than a uniform guess
    for name, (world, flags, layout) in LAYOUTS.items():
        out_file = tmp_path / f"{name}.json"
        codes = run_distributed(_layout_worker, world, [*base, *flags, "--output-json",
                                                        str(out_file)],
                                backend=None, timeout_s=300)
        assert codes == [0] * world, name
        got = json.loads(out_file.read_text())
        assert got["layout"] == layout
        assert got["tokens"] == one["tokens"] and got["windows"] == one["windows"], name
        for key in ("nll_sum", "token_ppl", "word_ppl"):
            assert got[key] == pytest.approx(one[key], rel=1e-6), (name, key)


# -- the CLI: WikiText-2, GPT-2 BPE ------------------------------------------------------------
@pytest.fixture(scope="module")
def wiki(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("wiki")
    ckpt = gpt2_checkpoint(work)
    text = work / "wiki_head.txt"
    text.write_text(wikitext_slice(30_000))  # `head -c 30000 test.txt`: a quick check
    return {"ckpt": ckpt, "text": text, "work": work}


def test_wikitext_end_to_end(wiki, tmp_path, capsys):
    from megapre.data.tokenizers import TokenizerConfig, build_tokenizer
    from tiny_checkpoints import GPT2_DIR

    text = wiki["text"].read_text()
    tok = build_tokenizer(TokenizerConfig("GPT2BPETokenizer",
                                          vocab_file=str(GPT2_DIR / "vocab.json"),
                                          merge_file=str(GPT2_DIR / "merges.txt")))
    results = {}
    for stride in (None, 32):
        flags = [] if stride is None else ["--stride", str(stride)]
        out_json = tmp_path / f"ppl{stride}.json"
        code, out, err = _cli(["--load", wiki["ckpt"], "--text-file", str(wiki["text"]),
                               "--micro-batch-size", "8", "--output-json", str(out_json),
                               *flags], capsys)
        assert code == 0, err
        got = json.loads(out.strip().splitlines()[-1])
        assert got == json.loads(out_json.read_text())
        results[stride] = got
    got = results[None]
    assert got["stride"] == got["seq_length"] == 64 and got["model"] == "gpt"
    assert got["tokens"] == len(tok.encode(text))  # every token, the first after the EOD too
    assert got["words"] == len(text.split()) and got["bytes"] == len(text.encode())
    assert got["token_ppl"] == pytest.approx(math.exp(got["nll_sum"] / got["tokens"]), rel=1e-9)
    assert got["word_ppl"] == pytest.approx(math.exp(got["nll_sum"] / got["words"]), rel=1e-9)
    assert got["word_ppl"] > got["token_ppl"]  # more tokens than words in BPE
    assert got["token_ppl"] < tok.vocab_size  # trained: better than a uniform guess
    assert got["windows"] == math.ceil(got["tokens"] / 64)
    half = results[32]
    assert half["tokens"] == got["tokens"] and half["windows"] == 1 + math.ceil(
        (got["tokens"] - 64) / 32)
    assert half["nll_sum"] != pytest.approx(got["nll_sum"], rel=1e-9)  # other contexts


def _error_line(code: int, err: str) -> str:
    lines = [x for x in err.strip().splitlines() if x]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_bad_flags_and_files(counting, tmp_path, capsys):
    ckpt, text = counting["ckpt"], str(counting["text"])
    cases = [
        (["--text-file", text, "--stride", "0"], r"--stride 0 must be between 1 and .* 32"),
        (["--text-file", text, "--stride", "33"], r"--stride 33"),
        (["--stride", "8"], r"--stride applies to --text-file only"),
        (["--text-file", text, "--data-path", "x"], r"--text-file and --data-path are mutually"),
        (["--text-file", text, "--eval-split", "valid"], r"--text-file and --eval-split"),
        (["--text-file", text, "--micro-batch-size", "0"], r"--micro-batch-size 0"),
        (["--text-file", str(tmp_path / "missing.txt")], r"--text-file .*missing.txt: cannot read"),
    ]
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"1 2 3\n4 5 \xe9 6\n")
    cases.append((["--text-file", str(bad)], r"--text-file .*latin1.txt:2: byte 0xe9 .*not UTF-8"))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    cases.append((["--text-file", str(empty)], r"--text-file .*empty.txt: nothing to score"))
    for flags, pattern in cases:
        code, _, err = _cli(["--load", ckpt, *flags], capsys)
        assert re.search(pattern, _error_line(code, err)), (flags, err)
    # a BERT checkpoint (its run config says so): refused before any weight is read
    bert = tmp_path / "bert_ckpt"
    shutil.copytree(ckpt, bert)
    for config in bert.glob("iter_*/config.json"):
        data = json.loads(config.read_text())
        data["model"]["model"] = "bert"
        config.write_text(json.dumps(data))
    code, _, err = _cli(["--load", str(bert), "--text-file", text], capsys)
    assert "--text-file scores text with a GPT" in _error_line(code, err) and "bert" in err

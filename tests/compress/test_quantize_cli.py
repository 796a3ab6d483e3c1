"""`megapre.compress quantize` end to end on a trained tiny GPT: the quantized checkpoint's linear
layers take <= 0.3x the float bytes, weight-int8 logits and perplexity stay close to fp32, the
quantized checkpoint runs in megapre.evaluate and megapre.generate (KV cache and full recompute
agree), gives the one-process perplexity in TP2 and PP2 (gloo), and bad input is one line, exit
2, nothing written."""
from __future__ import annotations

import json
import math

import pytest

from megapre.train.checkpoint import SafeFileSystemReader, resolve_checkpoint
from quant_cases import counting_case, evaluate, perplexity_argv, quantize

LINEAR = (".qkv.", ".proj.", ".fc1.", ".fc2.", ".gate.")


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict:
    return counting_case(tmp_path_factory.mktemp("quant"))


def _linear_bytes(ckpt: str) -> int:
    meta = SafeFileSystemReader(resolve_checkpoint(ckpt)).read_metadata()
    total = 0
    for key, entry in meta.state_dict_metadata.items():
        if key.startswith("model.") and any(p in key for p in LINEAR):
            total += math.prod(entry.size) * entry.properties.dtype.itemsize
    return total


def test_weight_int8_size_logits_and_perplexity(case, tmp_path):
    out = tmp_path / "wint8"
    summary = quantize(case, out, "weight-int8")
    assert summary["quantized_layers"] == 8 and summary["iteration"] == 10
    ratio = _linear_bytes(str(out)) / _linear_bytes(case["ckpt"])
    print(f"weight-int8: linear bytes {ratio:.3f}x fp32 (weights + scales + float biases), "
          f"logits relative error {summary['logits_rel_error']:.3g}")
    assert 0.25 <= ratio <= 0.3
    assert summary["logits_rel_error"] < 0.02
    fp32 = evaluate(perplexity_argv(case["ckpt"], case["text"], tmp_path / "f.json"))
    int8 = evaluate(perplexity_argv(str(out), case["text"], tmp_path / "q.json"))
    print(f"token perplexity fp32 {fp32['token_ppl']:.4f}, weight-int8 {int8['token_ppl']:.4f}")
    assert int8["tokens"] == fp32["tokens"]
    assert int8["token_ppl"] == pytest.approx(fp32["token_ppl"], rel=0.02)
    config = json.loads((resolve_checkpoint(str(out)) / "config.json").read_text())
    assert config["quantization"] == {"method": "weight-int8", "alpha": 0.5,
                                      "quantize_lm_head": False}


def test_generate_runs_quantized(case, tmp_path):
    from megapre.cli.generate import main

    out = tmp_path / "w8a8"
    quantize(case, out, "w8a8", "--quantize-lm-head")
    texts = []
    for flags in ([], ["--no-kv-cache"]):
        js = tmp_path / f"gen{len(flags)}.json"
        assert main(["--load", str(out), "--prompt", "3 6 9 12", "--max-new-tokens", "8",
                     "--greedy", "--output-json", str(js), *flags]) == 0
        sample = json.loads(js.read_text())["samples"][0]
        assert len(sample["ids"]) == 8
        texts.append(sample["ids"])
    assert texts[0] == texts[1]


def _layout_worker(rank: int, world: int, argv: list[str]) -> int:
    from megapre.cli.evaluate import main

    return main(argv)


@pytest.mark.slow
@pytest.mark.parametrize("method,flags", [("smoothquant", ["--quantize-lm-head"]),
                                          ("weight-int8", [])])
def test_layouts_equal_one_process(case, tmp_path, method, flags):
    from megapre.parallel.testing import run_distributed

    out = tmp_path / method
    quantize(case, out, method, *flags)
    one = evaluate(perplexity_argv(str(out), case["text"], tmp_path / "one.json"))
    for name, layout in (("tp2", ["--tensor-model-parallel-size", "2"]),
                         ("pp2", ["--pipeline-model-parallel-size", "2"])):
        js = tmp_path / f"{name}.json"
        codes = run_distributed(_layout_worker, 2, perplexity_argv(str(out), case["text"], js,
                                                                   *layout),
                                backend=None, timeout_s=300)
        assert codes == [0, 0], name
        got = json.loads(js.read_text())
        assert got["tokens"] == one["tokens"], name
        assert got["nll_sum"] == pytest.approx(one["nll_sum"], rel=1e-5), name


def _bad(case, tmp_path, capsys, *argv: str, match: str) -> None:
    from megapre.cli.compress import main

    save = tmp_path / "out"
    base = {"--load": case["ckpt"], "--method": "w8a8", "--save": str(save)}
    given = dict(zip(argv[::2], argv[1::2]))
    words = [w for k, v in {**base, **given}.items() for w in (k, v) if v is not None]
    assert main(["quantize", *words]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err
    assert not save.exists() or not any(save.iterdir())


def test_bad_input(case, tmp_path, capsys):
    from conftest import write_counting_corpus

    _bad(case, tmp_path, capsys, "--alpha", "1.5", match="--alpha")
    _bad(case, tmp_path, capsys, "--method", "smoothquant", match="--calib-data")
    _bad(case, tmp_path, capsys, "--calib-data", str(tmp_path / "nothing"), match="--calib-data")
    wide = write_counting_corpus(str(tmp_path / "wide"), eod=500)  # ids beyond the vocabulary
    _bad(case, tmp_path, capsys, "--calib-data", wide, match="outside the tokenizer's vocab")
    _bad(case, tmp_path, capsys, "--calib-data", case["corpus"], "--calib-samples", "0",
         match="--calib-samples")
    _bad(case, tmp_path, capsys, "--save", case["ckpt"], match="--save")
    quantized = tmp_path / "q"
    quantize(case, quantized, "weight-int8")
    _bad(case, tmp_path, capsys, "--load", str(quantized), match="already quantized")


def test_training_refuses_a_quantized_checkpoint(case, tmp_path, capsys):
    from conftest import tiny_gpt_flags
    from megapre.cli.pretrain import main

    quantized = tmp_path / "q"
    quantize(case, quantized, "weight-int8")
    capsys.readouterr()
    flags = tiny_gpt_flags(case["corpus"], tmp_path, "--load", str(quantized), "--finetune",
                           train_iters=1)
    assert main(flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "int8-quantized" in err[0], err


def test_module_entry_point():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "megapre.compress", "quantize", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--quantize-lm-head" in done.stdout
    done = subprocess.run([sys.executable, "-m", "megapre.compress", "quantize", "--load", "x"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--save" in done.stderr

"""README's "From text to a trained model" block, run exactly as written (in a scratch directory
that links `tools/`, `examples/` and README.md from this checkout): the commands must work when pasted in
order, each using what the one before it wrote."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SECTION = "## From text to a trained model"


def walkthrough_block() -> str:
    text = (ROOT / "README.md").read_text()
    assert SECTION in text, f"README.md lost its {SECTION!r} section"
    match = re.search(r"```bash\n(.*?)```", text[text.index(SECTION):], re.S)
    assert match, f"no ```bash block under {SECTION!r}"
    return match.group(1)


def test_walkthrough_names_each_output_it_uses():
    """Cheap check of the chain: the tokenizer, data and checkpoint that later steps use are the
    ones earlier steps write."""
    block = walkthrough_block()
    assert "--output-dir tok" in block and "--vocab-file tok/tokenizer-vocab.json" in block
    assert "--output-prefix data/demo" in block and "--data-path data/demo_text_document" in block
    assert "--save ckpt" in block and block.count("--load ckpt") >= 3


@pytest.mark.slow
def test_walkthrough_runs_as_written(tmp_path):
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not on PATH")
    for name in ("tools", "examples", "README.md"):
        (tmp_path / name).symlink_to(ROOT / name)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "python").symlink_to(sys.executable)
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1")
    script = "set -euo pipefail\nset -x\n" + walkthrough_block()
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]

    evaluation = json.loads(next(line for line in proc.stdout.splitlines()
                                 if line.startswith("{") and '"ppl"' in line))
    assert evaluation["iteration"] == 100 and evaluation["split"] == "test"
    assert evaluation["lm_loss"] < 8.0  # trained: uniform over 8000 ids would be 8.99
    assert "Return the" in proc.stdout
    assert (tmp_path / "ckpt" / "iter_0000150").is_dir(), "step 6 did not train on to 150"
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("iteration") == 150 for r in records), "the resumed run did not append its metrics"
    report = json.loads((tmp_path / "ft" / "report.json").read_text())
    assert report["test"]["names"] == ["numpy", "stdlib", "torch"]
    assert report["test"]["accuracy"] > 0.5  # three balanced classes: chance is 1/3
    task = json.loads(next(line for line in proc.stdout.splitlines()
                           if line.startswith("{") and '"confusion_matrix"' in line))
    assert task["confusion_matrix"] == report["test"]["confusion_matrix"]
    ppl = json.loads(next(line for line in proc.stdout.splitlines()
                          if line.startswith("{") and '"word_ppl"' in line))
    assert ppl["tokens"] > 1000 and ppl["word_ppl"] > ppl["token_ppl"] > 1

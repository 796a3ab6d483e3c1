"""tools/build_index.py (and the training start-up, which builds through the same CachedDataset)
reports a long index build on stderr: what it builds, time spent and an ETA, at most every ~2 s
(issue 10: it was silent for 19 s)."""
from __future__ import annotations

import time

from conftest import write_counting_corpus
from megapre.cli.build_index import main
from megapre.data import gpt_dataset
from megapre.data.build_progress import BuildProgress


def test_build_index_prints_progress_with_eta_while_building(tmp_path, capsys, monkeypatch):
    prefix = write_counting_corpus(tmp_path / "count", docs=200)
    real = gpt_dataset.build_sample_idx

    def slow(*args, **kwargs):              # a big build: the sample index takes a while
        time.sleep(2.6)
        return real(*args, **kwargs)

    monkeypatch.setattr(gpt_dataset, "build_sample_idx", slow)
    assert main(["--data-path", prefix, "--split", "100,0,0", "--seq-length", "16",
                 "--train-iters", "10", "--global-batch-size", "4", "--eval-iters", "0",
                 "--data-cache-path", str(tmp_path / "cache")]) == 0
    err = capsys.readouterr().err.splitlines()
    progress = [line for line in err if line.startswith("[index] building")]
    assert progress, err
    assert "GPTDataset indices for train split of" in progress[0] and "count" in progress[0]
    assert "sample index" in progress[0] and "ETA" in progress[0]
    assert any(line.startswith("[index] built GPTDataset") for line in err)


def test_quick_builds_stay_silent_and_lines_are_throttled():
    lines: list[str] = []
    with BuildProgress("x", interval=0.2, emit=lines.append) as p:
        p.advance(1, 4, "step 2")
        time.sleep(0.5)
    assert 2 <= len(lines) <= 4 and "[25%, ETA" in lines[0] and lines[-1].startswith("[index] built x")
    lines.clear()
    with BuildProgress("y", interval=0.5, emit=lines.append):
        pass
    assert lines == []

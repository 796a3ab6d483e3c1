"""Multi-node launch, as examples/slurm_multinode.sbatch does it: the sbatch script itself runs
under a stand-in Slurm (srun starts its command once per "node", in parallel, with SLURM_NODEID
set; scontrol names 127.0.0.1 as the first node), so two torchrun agents on this host act as two
nodes that meet through c10d rendezvous (`--nnodes 2 --node-rank 0|1 --rdzv-backend c10d
--rdzv-endpoint 127.0.0.1:PORT --nproc-per-node 2`), with TP2 inside a node and DP2 across nodes.
The same script on one "node" with one process gives the reference losses."""
from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from conftest import SHARED_DATA, write_counting_corpus

ROOT = Path(__file__).resolve().parents[2]
GPT2 = SHARED_DATA / "gpt2"
SBATCH = ROOT / "examples" / "slurm_multinode.sbatch"
EOD = 50256  # GPT-2's <|endoftext|>: the sbatch trains with GPT-2's tokenizer

FAKE_SRUN = """#!/usr/bin/env bash
# stand-in srun: the command once per node, in parallel, each with its SLURM_NODEID
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do
  cmd="$*"; echo "node $i: ${cmd//$'\n'/ }" >> "$FAKE_SLURM_LOG"
  SLURM_NODEID=$i "$@" & pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""
FAKE_SCONTROL = '#!/usr/bin/env bash\n[ "$1 $2" = "show hostnames" ] && echo 127.0.0.1\n'
FAKE_SQUEUE = "#!/usr/bin/env bash\necho 1:00:00\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """Counting sequences (ids below 40) ending in GPT-2's EOD: learnable in a few steps."""
    return write_counting_corpus(tmp_path_factory.mktemp("corpus") / "count_text_document", eod=EOD, seed=1)


@pytest.fixture()
def fake_slurm(tmp_path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("squeue", FAKE_SQUEUE)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755 | stat.S_IXUSR)
    return bin_dir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sbatch(bin_dir: Path, corpus: str, out: Path, nodes: int, gpus: int, tp: int):
    """Run the sbatch script as Slurm would on `nodes` nodes, tiny model via trailing flags."""
    out.mkdir()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1", "FAKE_SLURM_LOG": str(out / "srun.log"),
           "SLURM_NNODES": str(nodes), "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "n[1-2]",
           "SLURM_SUBMIT_DIR": str(ROOT), "DATA_PATH": corpus, "CHECKPOINT_DIR": str(out / "ckpt"),
           "GPUS_PER_NODE": str(gpus), "TP": str(tp), "MASTER_PORT": str(_free_port()),
           "PRECISION": "fp32", "DEVICE": "cpu", "VOCAB_FILE": str(GPT2 / "vocab.json"),
           "MERGE_FILE": str(GPT2 / "merges.txt")}
    tiny = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", "32", "--max-position-embeddings", "32", "--micro-batch-size", "2",
            "--global-batch-size", "8", "--train-iters", "8", "--lr", "3e-3",
            "--lr-warmup-iters", "2", "--min-lr", "3e-4", "--eval-interval", "8",
            "--eval-iters", "2", "--log-interval", "2", "--split", "90,5,5",
            "--make-vocab-size-divisible-by", "8", "--num-workers", "0",
            "--save-interval", "8", "--data-cache-path", str(out / "cache")]
    proc = subprocess.run(["bash", str(SBATCH), *tiny], cwd=out, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = [json.loads(x) for x in (out / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["iteration"], r.get("split", "train"), r["loss"]) for r in rows]
    return losses, (out / "srun.log").read_text().splitlines(), proc.stdout + proc.stderr


@pytest.mark.slow
def test_sbatch_two_nodes_tp2_dp2_match_one_process(corpus, fake_slurm, tmp_path):
    if not (GPT2 / "vocab.json").is_file():
        pytest.skip(f"GPT-2 tokenizer files not found in {GPT2} (the shared data directory)")
    single, _, _ = _sbatch(fake_slurm, corpus, tmp_path / "one", nodes=1, gpus=1, tp=1)
    both, srun2, log = _sbatch(fake_slurm, corpus, tmp_path / "two", nodes=2, gpus=2, tp=2)

    assert [line.split(":")[0] for line in srun2] == ["node 0", "node 1"]
    launch = srun2[0]
    for flag in ("--nnodes", "--node-rank", "--rdzv-backend c10d", "--rdzv-endpoint"):
        assert flag in launch, launch
    assert "nodes x 2 GPUs, rendezvous at 127.0.0.1:" in log
    # rank 0 alone logs iterations: exactly one agent's output carries them
    assert len(re.findall(r"iteration\s+8/8", log)) == 1, log[-3000:]

    assert [x[:2] for x in both] == [x[:2] for x in single]
    assert single[-1][:2] == (8, "test") and len(single) == 6
    for (it, split, a), (_, _, b) in zip(single, both):
        assert b == pytest.approx(a, rel=1e-5), (it, split)
    latest = tmp_path / "two" / "ckpt" / "latest_checkpointed_iteration.txt"
    assert latest.read_text().strip() == "8"

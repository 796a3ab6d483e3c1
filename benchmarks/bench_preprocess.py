"""Preprocessing throughput: megapre's tools/preprocess_data.py vs Megatron's algorithm, same corpus,
same tokenizer, same machine, same run. On a shared machine the CPU-seconds columns (whole process tree) are the
steadier comparison; wall-clock columns depend on what else runs (the load average is printed).

    python benchmarks/bench_preprocess.py                    # workers 1 and 2, plus a 4x-input run
    python benchmarks/bench_preprocess.py --workers 2 --no-4x --json out.json
    python benchmarks/bench_preprocess.py --repeat 3           # best of 3 per case (shared machine)

Corpus: ../shared/data/gutenberg/gutenberg_en_24MiB.txt cut into JSONL documents (paragraphs joined
until a document reaches 2,000 characters; deterministic), GPT-2 BPE from ../shared/data/gpt2,
--append-eod. The Megatron row is Megatron-LM's tools/preprocess_data.py algorithm re-created here:
a multiprocessing.Pool whose workers json-parse and encode ONE document per task (imap, chunksize
32), returning token lists that the main process writes with megatron-core's IndexedDatasetBuilder.
Both sides tokenize with megapre's GPT2BPETokenizer, so the difference is the pipeline, not the BPE.

Each run is a separate process, timed end to end (wall, imports included, as the ANCHORS.md
measurement of Megatron-LM was) and from after its imports (tokenizer build, pool start, the
streaming loop and finalize: the part a bigger corpus scales); peak memory is the sum over the
process tree (RSS and PSS, polled every 50 ms). Outputs of both pipelines are compared byte for byte.
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import re
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CORPUS = DATA / "gutenberg" / "gutenberg_en_24MiB.txt"
GPT2 = DATA / "gpt2"
MIN_CHARS = 2000
# ANCHORS.md: Megatron-LM core_v0.16.1 tools/preprocess_data.py on this corpus, 2-core machine.
ANCHOR = {1: 241_000, 2: 384_000}
sys.path.insert(0, str(ROOT))  # this checkout's megapre, also in the baseline's process


# ----------------------------------------------------------------------------- corpus

def cut_documents(text: str, min_chars: int = MIN_CHARS) -> list[str]:
    """Paragraphs (blank-line separated) joined until a document has >= min_chars characters;
    a shorter tail is dropped."""
    docs, cur, n = [], [], 0
    for para in re.split(r"\n[ \t]*\n", text):
        cur.append(para)
        n += len(para) + 2
        if n - 2 >= min_chars:
            docs.append("\n\n".join(cur))
            cur, n = [], 0
    return docs


def write_corpus(workdir: Path, copies: int, max_docs: int | None = None) -> tuple[Path, int]:
    docs = cut_documents(CORPUS.read_text(encoding="utf-8"))[:max_docs]
    path = workdir / f"gutenberg_docs_{len(docs)}_x{copies}.jsonl"
    lines = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs).encode()
    if not path.exists() or path.stat().st_size != len(lines) * copies:
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            for _ in range(copies):
                f.write(lines)
        os.replace(tmp, path)
    return path, len(docs) * copies


# ----------------------------------------------------------------------------- memory polling

def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                out.append(int(entry))
    return out


def _mem_kib(pid: int) -> tuple[int, int]:
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


class TreeMemory(threading.Thread):
    """Peak of sum(RSS), sum(PSS) and max single RSS over a process and its descendants."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_rss = self.peak_pss = self.peak_one = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            tree, frontier = [], [self.pid]
            while frontier:
                p = frontier.pop()
                tree.append(p)
                frontier += _children(p)
            mems = [_mem_kib(p) for p in tree]
            self.peak_rss = max(self.peak_rss, sum(m[0] for m in mems))
            self.peak_pss = max(self.peak_pss, sum(m[1] for m in mems))
            self.peak_one = max([self.peak_one] + [m[0] for m in mems])
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def timed_run(cmd: list[str]) -> dict:
    """Run cmd; wall time, CPU seconds of the whole process tree (workers are waited for by their
    parent, so their usage reaches RUSAGE_CHILDREN), and peak tree memory."""
    load = os.getloadavg()[0]
    cpu0 = _children_cpu()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    mem = TreeMemory(proc.pid)
    mem.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    cpu = _children_cpu() - cpu0
    mem.stop()
    if proc.returncode != 0:
        raise SystemExit(f"benchmark run failed ({proc.returncode}): {' '.join(cmd)}\n{err[-3000:]}")
    return {"wall_s": wall, "cpu_s": cpu, "stdout": out, "stderr": err, "load_before": load,
            "peak_rss_mb": mem.peak_rss / 1024, "peak_pss_mb": mem.peak_pss / 1024,
            "peak_one_rss_mb": mem.peak_one / 1024}


# ----------------------------------------------------------------------------- the two pipelines

def tok_flags() -> list[str]:
    return ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(GPT2 / "vocab.json"),
            "--merge-file", str(GPT2 / "merges.txt")]


def run_megapre(corpus: Path, prefix: Path, workers: int) -> dict:
    cmd = [sys.executable, "tools/preprocess_data.py", "--input", str(corpus), "--output-prefix",
           str(prefix), "--json-keys", "text", "--append-eod", "--workers", str(workers),
           "--progress-interval", "0", "--overwrite", *tok_flags()]
    r = timed_run(cmd)
    stats = json.loads(Path(f"{prefix}.stats.json").read_text())
    r.update(tokens=stats["tokens"]["text"], docs=stats["documents"], bytes=stats["bytes"],
             loop_s=stats["elapsed_s"])
    return r


def run_megatron(corpus: Path, prefix: Path, workers: int) -> dict:
    cmd = [sys.executable, __file__, "--_megatron-baseline", str(corpus), str(prefix), str(workers)]
    r = timed_run(cmd)
    r.update(json.loads(r["stdout"].strip().splitlines()[-1]))
    return r


def best_of(n: int, fn, *args) -> dict:
    """The fastest (wall-clock) of n runs; the others were slowed by something else."""
    runs = [fn(*args) for _ in range(max(n, 1))]
    return min(runs, key=lambda r: r["wall_s"])


class _MegatronEncoder:
    """Megatron-LM's per-document encoder: one JSON line in, token list + lengths out."""

    def __init__(self, tok_config) -> None:
        self.tok_config = tok_config

    def initializer(self) -> None:
        from megapre.data.tokenizers import build_tokenizer

        _MegatronEncoder.tokenizer = build_tokenizer(self.tok_config)

    def encode(self, json_line: str):
        data = json.loads(json_line)
        tok = _MegatronEncoder.tokenizer
        ids, lens = {}, {}
        for key in ("text",):
            doc_ids, sentence_lens = [], []
            for sentence in [data[key]]:
                sentence_ids = tok.encode(sentence)
                if sentence_ids:
                    doc_ids.extend(sentence_ids)
                    sentence_lens.append(len(sentence_ids))
            if doc_ids:
                doc_ids.append(tok.eod)
                sentence_lens[-1] += 1
            ids[key], lens[key] = doc_ids, sentence_lens
        return ids, lens, len(json_line)


def megatron_baseline(corpus: str, prefix: str, workers: int) -> None:
    """Runs in its own process (see run_megatron); prints one JSON line of results."""
    import multiprocessing

    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from megapre.data.tokenizers import TokenizerConfig, build_tokenizer

    t0 = time.perf_counter()
    config = TokenizerConfig("GPT2BPETokenizer", vocab_file=str(GPT2 / "vocab.json"),
                             merge_file=str(GPT2 / "merges.txt"))
    encoder = _MegatronEncoder(config)
    vocab = build_tokenizer(config).vocab_size
    builder = IndexedDatasetBuilder(f"{prefix}_text_document.bin", dtype=DType.optimal_dtype(vocab))
    docs = tokens = nbytes = 0
    with open(corpus, "r", encoding="utf-8") as fin, \
            multiprocessing.Pool(workers, initializer=encoder.initializer) as pool:
        for doc, sentence_lens, processed in pool.imap(encoder.encode, fin, 32):
            nbytes += processed
            builder.add_document(doc["text"], sentence_lens["text"])
            docs += 1
            tokens += len(doc["text"])
    builder.finalize(f"{prefix}_text_document.idx")
    print(json.dumps({"loop_s": time.perf_counter() - t0, "docs": docs, "tokens": tokens,
                      "bytes": nbytes}))


# ----------------------------------------------------------------------------- report

def row(name: str, workers: int, r: dict, ref: dict | None, blank: str = "1.00x") -> str:
    """A table row; ratios are against `ref` (None: the reference itself, shown as `blank`)."""
    tps = r["tokens"] / r["wall_s"]
    loop_tps = r["tokens"] / r["loop_s"]
    ratio = f"{tps / (ref['tokens'] / ref['wall_s']):.2f}x" if ref else blank
    loop_ratio = f"{loop_tps / (ref['tokens'] / ref['loop_s']):.2f}x" if ref else blank
    cpu_tps = r["tokens"] / r["cpu_s"]
    cpu_ratio = f"{cpu_tps / (ref['tokens'] / ref['cpu_s']):.2f}x" if ref else blank
    return (f"| {name} | {workers} | {r['wall_s']:.1f} | {r['docs'] / r['wall_s']:,.0f} | "
            f"{r['bytes'] / 1e6 / r['wall_s']:.2f} | {tps / 1e3:,.0f}k | {ratio} | "
            f"{r['loop_s']:.1f} | {loop_tps / 1e3:,.0f}k | {loop_ratio} | "
            f"{r['cpu_s']:.1f} | {cpu_tps / 1e3:,.0f}k | {cpu_ratio} | "
            f"{r['peak_rss_mb']:,.0f} / {r['peak_pss_mb']:,.0f} / {r['peak_one_rss_mb']:,.0f} | "
            f"{r['load_before']:.2f} |")


def _without_logs(obj):
    if isinstance(obj, dict):
        return {k: _without_logs(v) for k, v in obj.items() if k not in ("stdout", "stderr")}
    return obj


HEADER = ("| pipeline | workers | wall s | docs/s | MB/s | tokens/s | vs Megatron | after-imports s | "
          "after-imports tokens/s | vs Megatron | CPU s (tree) | tokens per CPU-s | vs Megatron | "
          "peak MB: tree RSS / tree PSS / largest proc | load avg |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--_megatron-baseline":
        megatron_baseline(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--no-4x", action="store_true", help="skip the 4x-input memory run")
    ap.add_argument("--workdir", default="/tmp/megapre_bench_preprocess")
    ap.add_argument("--json", default=None, help="write the raw results here")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each case N times and keep the fastest (wall) run (noisy machines)")
    ap.add_argument("--max-docs", type=int, default=None, help="first N documents only (smoke test)")
    args = ap.parse_args()
    for need in (CORPUS, GPT2 / "vocab.json", GPT2 / "merges.txt"):
        if not need.exists():
            raise SystemExit(f"missing {need}: the benchmark needs ../shared/data beside the repo")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    corpus, ndocs = write_corpus(work, 1, args.max_docs)
    print(f"corpus: {corpus} ({corpus.stat().st_size / 1e6:.1f} MB, {ndocs:,} documents of >= "
          f"{MIN_CHARS} chars); {os.cpu_count()} CPUs; load avg {os.getloadavg()}", flush=True)
    results, lines = {}, []
    for w in args.workers:
        meg = best_of(args.repeat, run_megatron, corpus, work / f"megatron_w{w}", w)
        ours = best_of(args.repeat, run_megapre, corpus, work / f"megapre_w{w}", w)
        same = all(filecmp.cmp(work / f"megatron_w{w}_text_document{s}",
                               work / f"megapre_w{w}_text_document{s}", shallow=False)
                   for s in (".bin", ".idx"))
        results[w] = {"megatron": meg, "megapre": ours, "identical_output": same}
        lines += [row("Megatron algorithm (megatron-core builder)", w, meg, None),
                  row("megapre", w, ours, meg)]
        print(f"workers {w}: megapre {ours['tokens'] / ours['wall_s'] / 1e3:,.0f}k tokens/s vs "
              f"Megatron {meg['tokens'] / meg['wall_s'] / 1e3:,.0f}k; outputs byte-identical: {same}",
              flush=True)
    if not args.no_4x:
        corpus4, _ = write_corpus(work, 4, args.max_docs)
        w = max(args.workers)
        r = best_of(args.repeat, run_megapre, corpus4, work / "megapre_x4", w)
        results["x4"] = r
        lines.append(row("megapre, 4x input", w, r, None, blank="-"))
        corpus4.unlink()
        one = results[w]["megapre"]
        print(f"peak memory, megapre {w} worker(s): 1x input {one['peak_pss_mb']:.0f} MB PSS / "
              f"{one['peak_rss_mb']:.0f} MB RSS (tree); 4x input {r['peak_pss_mb']:.0f} MB PSS / "
              f"{r['peak_rss_mb']:.0f} MB RSS", flush=True)
    print()
    print(HEADER)
    print("\n".join(lines))
    print("\nANCHORS.md, Megatron-LM itself on this corpus (2-core machine): "
          + ", ".join(f"{w} worker(s) {t / 1e3:.0f}k tokens/s" for w, t in ANCHOR.items()))
    for w in args.workers:
        print(f"workers {w}: outputs of both pipelines byte-identical (.bin and .idx): "
              f"{results[w]['identical_output']}")
    if args.json:
        Path(args.json).write_text(json.dumps(_without_logs(results), indent=2))
    for p in work.glob("*_text_document.*"):
        p.unlink()


if __name__ == "__main__":
    main()

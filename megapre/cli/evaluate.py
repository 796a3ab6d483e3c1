"""`python -m megapre.evaluate --load CKPT [--data-path PREFIX ...] [--eval-split all|train|valid|test]
[--eval-iters N|all]`: loss and perplexity of a checkpoint on an indexed dataset;
`--text-file FILE [--stride S]`: perplexity of a raw text file (GPT), token- and word-level.

The model, tokenizer, sequence length and data settings default to the run's saved config.json;
flags override the data, the batch sizes and the parallel layout (the checkpoint loads in any
TP/PP/DP: `torchrun --nproc-per-node 4 -m megapre.evaluate --tensor-model-parallel-size 2 ...`).
GPT: causal-LM loss over the loss-mask tokens; BERT: masked-LM loss, sentence-order loss and
accuracy. The loss is the token-weighted mean over all scored batches; ppl = exp(LM loss).
--text-file tokenizes the whole file once, as one text (no document separators are added
inside it), with the checkpoint's tokenizer, behind one end-of-document token, and scores every
token once with a sliding window of --seq-length tokens that moves --stride tokens at a time
(default --seq-length: windows that do not overlap; a smaller stride gives each token at least
seq-length - stride tokens of context). It reports the token-level perplexity and the word-level
one, exp(total NLL / whitespace-separated words of the file), the number papers quote for
WikiText (megapre/inference/perplexity.py). Data-parallel ranks share the windows.
Prints one JSON line (rank 0); --output-json writes the same object to a file.
Exit codes: 0 done, 2 bad input (the message names the flag or file), 1 anything else.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from megapre.data.args import DataArgs
from megapre.data.errors import DataError
from megapre.data.split import SPLIT_NAMES
from megapre.inference import checkpoint_io
from megapre.inference.eval_data import EVAL_SPLITS, eval_dataset, select_data
from megapre.inference.logprobs import TokenScorer
from megapre.inference.perplexity import check_stride, count_words, stream_perplexity
from megapre.inference.scoring import score
from megapre.model.config import ConfigError
from megapre.train.args import validate
from megapre.train.data import batches, samples_per_split
from megapre.train.runtime import build_runtime
from megapre.train.step import EvalStep, StepConfig

from .common import (apply_common, autocast, checkpoint_parser, emit_record, is_main_rank,
                     run_cli)
from .evaluate_task import add_task_flags, evaluate_task
from .flags import add_section_flags, section_values

# Data flags shared with megapre.pretrain (one declaration, megapre.data.args.DataArgs).
CACHE_FLAGS = ("data_cache_path", "data_cache", "data_cache_node_local", "data_cache_wait",
               "megatron_compatible_blend")


def build_parser() -> argparse.ArgumentParser:
    p = checkpoint_parser("megapre.evaluate", __doc__)
    g = p.add_argument_group("data (default: the run's)")
    g.add_argument("--data-path", nargs="+", metavar="PREFIX",
                   help="dataset prefix(es) or a weighted blend 'W1 P1 W2 P2' (default: the run's "
                        "data, and --eval-split valid)")
    g.add_argument("--split", help="train,valid,test proportions cutting --data-path "
                                   "(default: the run's --split)")
    g.add_argument("--eval-split", choices=EVAL_SPLITS,
                   help="which part to score: all of --data-path, or one split of it "
                        "(default: all with --data-path, else valid)")
    g.add_argument("--eval-iters", default="all", metavar="N|all",
                   help="global batches to score; 'all' = one pass over the split")
    g.add_argument("--micro-batch-size", type=int, help="default: the run's")
    g.add_argument("--global-batch-size", type=int, help="default: the run's")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="shard norms/dropout activations over the sequence within TP")
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
    add_section_flags(p, "data", DataArgs, only=CACHE_FLAGS, show_defaults=False,
                      title="index cache and blend order (default: the run's)")
    add_text_file_flags(p)
    add_task_flags(p)
    return p


def _eval_iters(text: str) -> int | None:
    if text == "all":
        return None
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"--eval-iters {text!r} must be a positive integer or 'all'")
    return n


def _run_samples(cfg, args: argparse.Namespace, eval_split: str) -> int:
    """Samples the training run built its own valid/test split with. Asking for as many builds
    the very dataset the run validated on (a GPT split's sample order depends on how many
    epochs were built), so the first batches of `--eval-split valid` are the run's first
    validation batches. 0 when the data differs from the run's."""
    if eval_split not in ("valid", "test") or args.data_path or \
            (args.split is not None and args.split != cfg.data.split) or \
            cfg.train.global_batch_size is None:
        return 0
    return samples_per_split(cfg)[SPLIT_NAMES.index(eval_split)]


def _apply_batch_flags(cfg, args: argparse.Namespace) -> None:
    t, d = cfg.train, cfg.data
    if args.micro_batch_size is not None:
        t.micro_batch_size = args.micro_batch_size
        if args.global_batch_size is None:
            t.global_batch_size = None  # re-derived by validate: micro x DP
    if args.global_batch_size is not None:
        t.global_batch_size = args.global_batch_size
    for name, value in section_values(args, "data").items():
        setattr(d, name, value)
    d.num_workers = args.num_workers


def evaluate(args: argparse.Namespace) -> int:
    if args.task_data:
        if args.text_file is not None:
            raise ConfigError("--task-data and --text-file exclude each other; give one")
        return evaluate_task(args)
    check_text_file_flags(args)
    if args.text_file is not None:
        return evaluate_text_file(args)
    iters = _eval_iters(args.eval_iters)
    path = checkpoint_io.resolve(args.load, args.iteration)
    cfg = apply_common(checkpoint_io.saved_config(path), args)
    cfg.parallel.sequence_parallel = args.sequence_parallel
    eval_split = args.eval_split or ("all" if args.data_path else "valid")
    run_samples = _run_samples(cfg, args, eval_split)
    split = select_data(cfg, args.data_path, args.split, eval_split)
    _apply_batch_flags(cfg, args)
    rt = build_runtime(cfg)
    try:
        checkpoint_io.check_tokenizer(path, rt.tokenizer, args.allow_tokenizer_mismatch)
        cfg = validate(cfg, int(os.environ.get("WORLD_SIZE", "1")), rt.tokenizer.vocab_size).config
        gbs = cfg.train.global_batch_size
        dataset = eval_dataset(cfg, rt.tokenizer, split,
                               None if iters is None else max(iters * gbs, run_samples))
        if iters is None:
            iters = len(dataset) // gbs
            if iters == 0:
                raise ConfigError(f"the {eval_split} data has {len(dataset)} samples, fewer than "
                                  f"one global batch of {gbs}; lower --global-batch-size")
        info = checkpoint_io.load_weights(path, rt)
        step = EvalStep(rt.model, StepConfig(cfg.train.micro_batch_size, gbs))
        data = batches(dataset, 0, cfg, rt.mesh.dp_rank, rt.mesh.dp_size, rt.device)
        result = score(rt.model, step, data, iters, gbs,
                       lambda: autocast(rt.device, cfg.train.bf16))
        d = cfg.data
        record = {**result.as_dict(), "model": cfg.model.model, "checkpoint": str(path),
                  "iteration": int(info["iteration"]), "split": eval_split,
                  "data_path": list(d.data_path or getattr(d, f"{split}_data_path")),
                  "seq_length": cfg.model.seq_length, "global_batch_size": gbs,
                  "dataset_samples": len(dataset),
                  "layout": {"tp": rt.mesh.tp_size, "pp": rt.mesh.pp_size, "dp": rt.mesh.dp_size}}
        if is_main_rank():
            emit_record(record, args.output_json)
    finally:
        rt.close()
    return 0


# -- --text-file: sliding-window perplexity of raw text ------------------------------------------
def add_text_file_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("raw text perplexity (GPT; instead of --data-path)")
    g.add_argument("--text-file", type=Path, metavar="FILE",
                   help="score this UTF-8 text file as one text: token- and word-level "
                        "perplexity with a sliding window (--micro-batch-size windows at a time)")
    g.add_argument("--stride", type=int, metavar="S",
                   help="tokens the window moves by: each token is scored once, with at least "
                        "seq-length - S tokens of context (default: seq-length, windows that do "
                        "not overlap)")


def check_text_file_flags(args: argparse.Namespace) -> None:
    """--text-file replaces the dataset flags; --stride needs it."""
    if args.text_file is None:
        if args.stride is not None:
            raise ConfigError("--stride applies to --text-file only; give --text-file FILE")
        return
    clashing = [flag for flag, given in (
        ("--data-path", args.data_path), ("--split", args.split is not None),
        ("--eval-split", args.eval_split is not None), ("--eval-iters", args.eval_iters != "all"))
        if given]
    if clashing:
        raise ConfigError(f"--text-file and {clashing[0]} are mutually exclusive: --text-file "
                          "scores a raw text file, the other flags an indexed dataset")


def read_text_file(path: Path) -> str:
    """The file's text; DataError naming the file (and line) when it is missing or not UTF-8."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"--text-file {path}: cannot read it ({e.strerror or e})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"--text-file {path}:{line}: byte {data[e.start]:#04x} at offset "
                        f"{e.start} is not UTF-8; convert the file to UTF-8") from None


def evaluate_text_file(args: argparse.Namespace) -> int:
    """Sliding-window perplexity of --text-file under the checkpoint's GPT, in this job's layout."""
    path = checkpoint_io.resolve(args.load, args.iteration)
    cfg = apply_common(checkpoint_io.saved_config(path), args)
    if cfg.model.model != "gpt":
        raise ConfigError(f"--text-file scores text with a GPT; --load {args.load} holds a "
                          f"{cfg.model.model} checkpoint (use --data-path for its masked-LM loss)")
    seq = cfg.model.seq_length
    stride = seq if args.stride is None else args.stride
    check_stride(stride, seq)
    text = read_text_file(args.text_file)
    cfg.parallel.sequence_parallel = False  # windows of any length: no sequence sharding
    batch = cfg.train.micro_batch_size if args.micro_batch_size is None else args.micro_batch_size
    if batch < 1:
        raise ConfigError(f"--micro-batch-size {batch} must be >= 1 (windows per forward pass)")
    rt = build_runtime(cfg)
    try:
        checkpoint_io.check_tokenizer(path, rt.tokenizer, args.allow_tokenizer_mismatch)
        ids = rt.tokenizer.encode(text)
        if rt.tokenizer.eod is not None:
            ids = [rt.tokenizer.eod] + ids  # a document start: the first token is scored too
        if len(ids) < 2:
            raise DataError(f"--text-file {args.text_file}: nothing to score ({len(text)} "
                            "characters, no token after the document start)")
        info = checkpoint_io.load_weights(path, rt)
        result = stream_perplexity(TokenScorer(rt.model), ids, seq, stride, batch,
                                   count_words(text), lambda: autocast(rt.device, cfg.train.bf16))
        record = {**result.as_dict(), "model": cfg.model.model, "checkpoint": str(path),
                  "iteration": int(info["iteration"]), "text_file": str(args.text_file),
                  "bytes": len(text.encode("utf-8")), "seq_length": seq, "stride": stride,
                  "micro_batch_size": batch,
                  "document_start": "eod" if rt.tokenizer.eod is not None else "none",
                  "layout": {"tp": rt.mesh.tp_size, "pp": rt.mesh.pp_size, "dp": rt.mesh.dp_size}}
        if is_main_rank():
            emit_record(record, args.output_json)
    finally:
        rt.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("megapre.evaluate", lambda: evaluate(args))


if __name__ == "__main__":
    sys.exit(main())

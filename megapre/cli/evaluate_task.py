"""`python -m megapre.evaluate --load FINETUNED --task-data FILE [...]`: the fine-tuning report
(accuracy, macro-F1, per-class precision/recall/F1, confusion matrix, loss; or the regression
metrics) of a fine-tuned checkpoint on any labelled TSV/CSV/JSONL file, in any layout. Columns
default to the fine-tuning run's (--text-key/--text-pair-key/--label-key override). Prints the
report table and one JSON line (rank holding the last stage); --output-json writes the JSON,
--predictions-path one prediction per input line."""
from __future__ import annotations

import argparse

from .common import apply_common, emit_record


def add_task_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("labelled task (fine-tuned checkpoints)")
    g.add_argument("--task-data", nargs="+", metavar="FILE",
                   help="labelled .tsv/.csv/.jsonl file(s): report accuracy/F1 of a fine-tuned "
                        "checkpoint")
    g.add_argument("--text-key", help="text column/key (default: the fine-tuning run's)")
    g.add_argument("--text-pair-key", help="second text column/key (default: the run's)")
    g.add_argument("--label-key", help="label column/key (default: the run's)")
    g.add_argument("--predictions-path", metavar="FILE",
                   help="write one prediction per input line (TSV: source, prediction, "
                        "probability)")


def evaluate_task(args: argparse.Namespace) -> int:
    from megapre.data.tasks import TaskColumns
    from megapre.errors import ConfigError
    from megapre.train.checkpoint import resolve_checkpoint
    from megapre.train.finetune import evaluate_files, open_finetuned
    from megapre.train.task_eval import is_reporting_rank
    from megapre.train.task_report import format_report

    if args.data_path:
        raise ConfigError("--task-data and --data-path exclude each other: a fine-tuned "
                          "checkpoint is scored on labelled files")
    path = resolve_checkpoint(args.load, args.iteration)

    def adjust(cfg) -> None:
        apply_common(cfg, args)
        cfg.parallel.sequence_parallel = args.sequence_parallel
        if args.micro_batch_size is not None:
            cfg.train.micro_batch_size = args.micro_batch_size
        cfg.train.global_batch_size = args.global_batch_size

    ft = open_finetuned(path, adjust)
    try:
        t = ft.cfg.task
        columns = TaskColumns(args.text_key or t.text_key,
                              args.text_pair_key if args.text_pair_key is not None
                              else t.text_pair_key, args.label_key or t.label_key)
        report = evaluate_files(ft, args.task_data, columns, args.predictions_path)
        if report is not None and is_reporting_rank(ft.runtime.model):
            record = {**report, "checkpoint": str(path), "iteration": ft.iteration,
                      "task_data": list(args.task_data),
                      "layout": {"tp": ft.runtime.mesh.tp_size, "pp": ft.runtime.mesh.pp_size,
                                 "dp": ft.runtime.mesh.dp_size}}
            print(format_report(report, ", ".join(args.task_data)), flush=True)
            emit_record(record, args.output_json)
    finally:
        ft.close()
    return 0

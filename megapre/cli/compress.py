"""`python -m megapre.compress quantize --load CKPT --method weight-int8|w8a8|smoothquant
[--alpha 0.5] [--calib-data PREFIX --calib-samples N] [--quantize-lm-head] --save OUT`
(console script `megapre-compress`): post-training int8 quantization of a megapre checkpoint.

The result is a megapre checkpoint with int8 weights and per-channel scales that megapre.generate
and megapre.evaluate load in any TP/PP layout. Bad input exits 2 with one line and writes nothing.
"""
from __future__ import annotations

import argparse
import sys

from .common import HelpFormatter, emit_record, prog_name, run_cli

PROG = "megapre.compress"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog_name(PROG), description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    q = sub.add_parser("quantize", formatter_class=HelpFormatter,
                       help="int8 post-training quantization (weight-only, W8A8, SmoothQuant)")
    q.add_argument("--load", required=True, metavar="DIR", help="float checkpoint to quantize")
    q.add_argument("--save", required=True, metavar="DIR", help="new directory for the result")
    q.add_argument("--method", required=True, choices=("weight-int8", "w8a8", "smoothquant"),
                   help="weight-int8: int8 weights, float activations (decode); w8a8: int8 "
                        "weights and per-token int8 activations; smoothquant: w8a8 after "
                        "SmoothQuant smoothing (needs --calib-data)")
    q.add_argument("--alpha", type=float, default=0.5,
                   help="SmoothQuant migration strength in [0, 1]")
    q.add_argument("--calib-data", metavar="PREFIX",
                   help="preprocessed dataset (PREFIX.bin/.idx) made with the checkpoint's "
                        "tokenizer: calibration for smoothquant, an error report for all")
    q.add_argument("--calib-samples", type=int, default=16, metavar="N",
                   help="calibration samples of seq-length tokens")
    q.add_argument("--quantize-lm-head", action="store_true",
                   help="GPT output layer as int8 weight-only (per vocabulary row) too")
    q.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu",
                   help="where quantization runs")
    q.add_argument("--allow-tokenizer-mismatch", action="store_true",
                   help="calibrate even when the data's tokenizer fingerprint differs")
    q.add_argument("--output-json", metavar="FILE", help="also write the summary here")
    return p


def quantize(args: argparse.Namespace) -> int:
    from pathlib import Path

    from megapre.compress.config import QuantConfig
    from megapre.compress.quantize import QuantizeJob, quantize_checkpoint

    job = QuantizeJob(load=args.load, save=args.save,
                      quant=QuantConfig(args.method, args.alpha, args.quantize_lm_head),
                      calib_data=args.calib_data, calib_samples=args.calib_samples,
                      device=args.device, allow_tokenizer_mismatch=args.allow_tokenizer_mismatch)
    summary = quantize_checkpoint(job)
    emit_record(summary, Path(args.output_json) if args.output_json else None)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(prog_name(PROG), lambda: quantize(args))


if __name__ == "__main__":
    sys.exit(main())

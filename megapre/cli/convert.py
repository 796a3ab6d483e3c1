"""`megapre-convert` (also `python -m megapre.convert`): checkpoints in and out of megapre.

    megapre-convert hf-import --hf-dir HF_DIR --save CKPT      # GPT-2 / Llama -> megapre
    megapre-convert hf-export --load CKPT --hf-dir OUT [--dtype bf16]
    megapre-convert mcore-import --load MEGATRON_DIR --save CKPT [--iteration N]
                                                  # Megatron-LM torch_dist / legacy -> megapre
    megapre-convert mcore-export --load CKPT --save MEGATRON_DIR   # -> Megatron-LM torch_dist
    megapre-convert onnx --load CKPT --output model.onnx [--with-kv-cache]  # -> ONNX (Runtime)

An imported checkpoint is layout-independent: continue pretraining or fine-tune it under any
--tensor/--pipeline-model-parallel-size with `--load CKPT` (or `--finetune`). Errors are one
line naming the file or flag (exit 2); nothing half-written is left at the destination.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import prog_name, run_cli

PROG = "megapre.convert"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog_name(PROG), description=__doc__.split("\n\n")[0],
                                allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    imp = sub.add_parser("hf-import", help="a Hugging Face model directory -> a megapre checkpoint",
                         allow_abbrev=False)
    imp.add_argument("--hf-dir", required=True, type=Path, metavar="DIR",
                     help="config.json + model.safetensors (or shards) + tokenizer files")
    imp.add_argument("--save", required=True, type=Path, metavar="CKPT",
                     help="new (or empty) checkpoint directory")
    imp.add_argument("--null-tokenizer", action="store_true",
                     help="no tokenizer files: token ids only (NullTokenizer, last id = EOD)")
    exp = sub.add_parser("hf-export", help="a megapre checkpoint -> a Hugging Face directory",
                         allow_abbrev=False)
    exp.add_argument("--load", required=True, type=Path, metavar="CKPT",
                     help="checkpoint directory (its latest iteration unless --iteration)")
    exp.add_argument("--iteration", type=int, default=None)
    exp.add_argument("--hf-dir", required=True, type=Path, metavar="OUT",
                     help="output directory (replaced atomically once complete)")
    exp.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                     help="weights' dtype in the safetensors files")
    _add_mcore_import(sub)
    exp = sub.add_parser("mcore-export", allow_abbrev=False,
                         help="a megapre GPT checkpoint -> a Megatron-LM torch_dist checkpoint "
                              "(needs megatron-core)")
    exp.add_argument("--load", required=True, type=Path, metavar="CKPT",
                     help="checkpoint directory (its latest iteration unless --iteration)")
    exp.add_argument("--iteration", type=int, default=None)
    exp.add_argument("--save", required=True, type=Path, metavar="MEGATRON_DIR",
                     help="new (or empty) directory; written under a temporary name first")
    _add_onnx(sub)
    return p


def _add_onnx(sub) -> None:
    exp = sub.add_parser("onnx", allow_abbrev=False,
                         help="a megapre checkpoint -> one ONNX file (needs megapre[onnx])")
    exp.add_argument("--load", required=True, type=Path, metavar="CKPT",
                     help="checkpoint directory (its latest iteration unless --iteration); "
                          "pretraining (GPT or BERT) or fine-tuned (classifier)")
    exp.add_argument("--iteration", type=int, default=None)
    exp.add_argument("--output", required=True, type=Path, metavar="FILE",
                     help="the .onnx file (replaced atomically once complete)")
    exp.add_argument("--with-kv-cache", action="store_true",
                     help="GPT: attention_mask [batch, past + new] and past_key.{i}/"
                          "past_value.{i} inputs, present_key.{i}/present_value.{i} outputs, "
                          "for incremental (left-padded, batched) decoding")
    exp.add_argument("--opset", type=int, default=18, help="ONNX opset (18 or later)")
    exp.add_argument("--task-head", action="store_true",
                     help="require a fine-tuned checkpoint and export its classifier (detected "
                          "without this flag too)")


def _onnx(args: argparse.Namespace) -> int:
    from megapre.convert import onnx

    out = onnx.onnx_export(onnx.OnnxArgs(args.load, args.output, args.iteration,
                                         args.with_kv_cache, args.opset, args.task_head))
    print(f"exported {args.load} -> {out.path} ({out.kind}; inputs {', '.join(out.input_names)}; "
          f"outputs {', '.join(out.output_names)})", flush=True)
    return 0


def _add_mcore_import(sub) -> None:
    from .tokenizer_flags import add_tokenizer_flags

    imp = sub.add_parser("mcore-import", allow_abbrev=False,
                         help="a Megatron-LM (megatron-core GPTModel) checkpoint -> a megapre "
                              "checkpoint")
    imp.add_argument("--load", required=True, type=Path, metavar="MEGATRON_DIR",
                     help="Megatron-LM --save directory (torch_dist or legacy "
                          "model_optim_rng.pt), or one iter_XXXXXXX directory")
    imp.add_argument("--save", required=True, type=Path, metavar="CKPT",
                     help="new (or empty) checkpoint directory")
    imp.add_argument("--iteration", type=int, default=None,
                     help="default: latest_checkpointed_iteration.txt")
    imp.add_argument("--megatron-args", default=None, metavar="FLAGS",
                     help="the model's Megatron-LM flags as one string, e.g. \"--num-layers 24 "
                          "--hidden-size 2048 --num-attention-heads 16 --seq-length 2048 ...\": "
                          "needed for a model-only save (no args stored); they override the "
                          "saved args")
    add_tokenizer_flags(imp, required=False).description = (
        "default: the tokenizer in the checkpoint's saved args")


def _mcore_import(args: argparse.Namespace) -> int:
    from megapre.convert import mcore

    tok = {k: getattr(args, k) for k in mcore.TOKENIZER_KEYS}
    out = mcore.mcore_import(mcore.ImportArgs(args.load, args.save, args.iteration, tok,
                                              args.megatron_args))
    print(f"imported {args.load} -> {out} (load it with --load {out}, in any layout)",
          flush=True)
    return 0


def _run(args: argparse.Namespace) -> int:
    from megapre.convert import hf

    if args.command == "mcore-import":
        return _mcore_import(args)
    if args.command == "onnx":
        return _onnx(args)
    if args.command == "mcore-export":
        from megapre.convert import mcore_export

        out = mcore_export.mcore_export(mcore_export.ExportArgs(args.load, args.save,
                                                                args.iteration))
        print(f"exported {args.load} -> {out} (Megatron-LM: --load {out} --ckpt-format "
              "torch_dist)", flush=True)
        return 0
    if args.command == "hf-import":
        out = hf.hf_import(hf.ImportArgs(args.hf_dir, args.save, args.null_tokenizer))
        print(f"imported {args.hf_dir} -> {out} (load it with --load {out}, in any layout)",
              flush=True)
        return 0
    out, note = hf.hf_export(hf.ExportArgs(args.load, args.hf_dir, args.iteration, args.dtype))
    if note:
        print(f"note: {note}", flush=True)
    print(f"exported {args.load} -> {out} ({hf.auto_class(out)}.from_pretrained({str(out)!r}))",
          flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(prog_name(PROG), lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())

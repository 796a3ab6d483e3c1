"""`python -m megapre.finetune merge-lora --load FINETUNED --save OUT`: fold the LoRA adapters of
a fine-tuned checkpoint into its base weights (W += alpha/rank * B A, shard by shard) and save a
plain fine-tuned checkpoint (every weight, no adapters) that megapre.evaluate loads without the
base checkpoint. The base comes from the --pretrained-checkpoint recorded in the fine-tuned run
(override it when the base moved). Runs in any TP/PP layout (torchrun) or one process.
"""
from __future__ import annotations

import argparse
import sys

from .common import prog_name, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog_name("megapre.finetune") + " merge-lora",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, metavar="DIR", help="fine-tuned (LoRA) checkpoint")
    p.add_argument("--save", required=True, metavar="DIR", help="where the merged checkpoint goes")
    p.add_argument("--pretrained-checkpoint", metavar="DIR",
                   help="the adapters' base model (default: the one the run recorded)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    return p


def merge(args: argparse.Namespace) -> int:
    import os

    from megapre.errors import ConfigError
    from megapre.model.lora import merge_lora
    from megapre.train.checkpoint import resolve_checkpoint, save_checkpoint
    from megapre.train.finetune import open_finetuned

    path = resolve_checkpoint(args.load)
    if os.path.abspath(args.save) == os.path.abspath(args.load):
        raise ConfigError("--save must differ from --load (the adapters would be overwritten)")

    def adjust(cfg) -> None:
        if cfg.task.lora_rank is None:
            raise ConfigError(f"--load {args.load}: the run did not use LoRA; nothing to merge")
        if args.pretrained_checkpoint:
            cfg.task.pretrained_checkpoint = args.pretrained_checkpoint
        p = cfg.parallel
        p.tensor_model_parallel_size = args.tensor_model_parallel_size
        p.pipeline_model_parallel_size = args.pipeline_model_parallel_size
        p.even_pipeline()  # the merge's own layout
        p.sequence_parallel = False
        cfg.train.device = args.device
        cfg.train.global_batch_size = None

    ft = open_finetuned(path, adjust)
    try:
        merged = sum(merge_lora(m) for m in ft.runtime.model.models)
        cfg = ft.cfg
        cfg.task.lora_rank = None
        state = dict(ft.task_state, lora=None, base_fingerprint=None, merged_from=str(path))
        save_checkpoint(args.save, ft.iteration, ft.runtime.model, None, ft.runtime.mesh,
                        config=cfg.to_dict(), tracker=ft.runtime.tracker,
                        extra={"task": state}, tokenizer=ft.runtime.tokenizer.describe())
        from megapre.data.notify import is_main_process

        if is_main_process():
            print(f"merged LoRA adapters of {merged} layers into the weights; saved "
                  f"{args.save} (iteration {ft.iteration})", flush=True)
    finally:
        ft.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(prog_name("megapre.finetune") + " merge-lora", lambda: merge(args))


if __name__ == "__main__":
    sys.exit(main())

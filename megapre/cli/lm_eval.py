"""`megapre-lm-eval --model megapre --model_args load=CKPT --tasks TASKS ...`: EleutherAI's
lm-evaluation-harness on megapre GPT checkpoints.

The harness's CLI only knows its own model names, so this front end registers megapre's
(megapre/inference/lm_eval_model.py) and hands every argument to the harness's own entry point
(`lm_eval.__main__.cli_evaluate`): all of its flags work as documented by lm-eval (`--tasks`,
`--num_fewshot`, `--limit`, `--include_path DIR` for your own task YAMLs, `--output_path`,
`--log_samples`, `ls tasks`, ...). `--model megapre` is the default here. Model arguments:
load=DIR (required), iteration, batch_size, max_length (default: the checkpoint's --seq-length),
stride (rolling windows; default max_length), device, tensor_model_parallel_size,
pipeline_model_parallel_size (under torchrun, TP x PP = WORLD_SIZE), bf16, seed, vocab_file,
merge_file, tokenizer_model, allow_tokenizer_mismatch.
Needs `pip install lm-eval` (or megapre[eval]). Exit codes: 0 done, 2 bad input (one line).
"""
from __future__ import annotations

import sys

from megapre.errors import ConfigError

from .common import prog_name, run_cli

PROG = "megapre-lm-eval"


def with_default_model(argv: list[str]) -> list[str]:
    """`--model megapre` unless the command line names a model (or is not an evaluation run)."""
    if not argv or argv[0] in ("ls", "validate") or any(a in ("-h", "--help") for a in argv):
        return argv
    if any(a in ("--model", "-M") or a.startswith("--model=") for a in argv):
        return argv
    head = argv[:1] if argv[0] == "run" else []
    return [*head, "--model", "megapre", *argv[len(head):]]


def _harness(argv: list[str]) -> int:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as e:
        raise ConfigError(f"lm-eval is not installed ({e}): pip install lm-eval "
                          "(or pip install 'megapre[eval]')") from None
    import megapre.inference.lm_eval_model  # noqa: F401  (registers the "megapre" model)

    if not argv or any(a in ("-h", "--help") for a in argv):
        print(__doc__.split("\n\n", 1)[1].strip() + "\n\nlm-eval's own help:\n", flush=True)
    saved = sys.argv
    sys.argv = [prog_name(PROG), *with_default_model(argv)]  # the harness parses sys.argv
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    return run_cli(PROG, lambda: _harness(args))


if __name__ == "__main__":
    sys.exit(main())

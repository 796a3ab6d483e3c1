"""`python tools/estimate_memory.py <megapre.pretrain flags> --world-size N [--json]` (console
`megapre-estimate-memory`): parameters, the most loaded rank's memory and FLOPs per step of a
pretraining config before launch (the numbers come from megapre/launch/memory.py). The vocabulary
comes from --vocab-size N or the run's tokenizer flags. The estimate is for GPUs unless
--device cpu, whatever this machine has; the report names the device and attention backend it
assumed. Exit codes: 0 done, 2 bad input."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from megapre.errors import ConfigError
from megapre.launch.memory import estimate, report
from megapre.train.args import PretrainConfig

from .common import prog_name
from .flags import parse_config


def vocab_size(cfg: PretrainConfig) -> int:
    if cfg.data.vocab_size is not None and cfg.data.tokenizer_type in (None, "NullTokenizer"):
        return cfg.data.vocab_size
    if cfg.data.tokenizer_type is None:
        raise ConfigError("give --vocab-size N, or the tokenizer flags of the run "
                          "(--tokenizer-type with --vocab-file/--merge-file/--tokenizer-model)")
    from megapre.data.tokenizers import build_tokenizer

    return build_tokenizer(cfg.tokenizer_config()).vocab_size


def main(argv: list[str] | None = None) -> int:
    prog = prog_name("megapre-estimate-memory")
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--world-size", type=int, default=1)
    pre.add_argument("--json", action="store_true")
    extra, rest = pre.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        print(f"{prog}: the flags of megapre.pretrain plus --world-size N (processes) and "
              "--json; --vocab-size N or the tokenizer flags give the vocabulary; the estimate "
              "is for GPUs unless --device cpu.\n")
    if extra.world_size < 1:
        print(f"{prog}: error: --world-size={extra.world_size} must be >= 1", file=sys.stderr)
        return 2
    try:
        cfg = parse_config(rest, prog=prog)
        est = estimate(cfg, extra.world_size, vocab_size(cfg))
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    if extra.json:
        out = asdict(est)
        out["peak_bytes"] = est.peak_bytes()
        print(json.dumps(out, indent=2))
    else:
        print(report(est))
    return 0

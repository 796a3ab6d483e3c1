"""How many of Megatron-LM's 216 GPT/BERT functional-test configs (tests/fixtures/megatron_configs,
commit d98e8a64dd) megapre runs unchanged, and why the others are refused: each config goes
through `--config` and the validator with placeholder paths, as tests/cli/test_megatron_configs.py
does. Prints a table of refusals by the flag that stopped them, and how megapre answers each of
the 877 flags of Megatron's parser (megapre/cli/megatron_flag_names.py).

    python benchmarks/megatron_config_coverage.py [--list]
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="also list every refused config")
    args = parser.parse_args()
    from cli.test_megatron_configs import CONFIGS, ENV, _outcome
    from megapre.cli.megatron_flags import coverage_line

    os.environ.update(ENV)
    accepted, by_flag = [], collections.defaultdict(list)
    for path in CONFIGS:
        message = _outcome(path)
        if message is None:
            accepted.append(path)
        else:
            by_flag[message.split(":")[0]].append((path, message))
    print(f"accepted {len(accepted)} of {len(CONFIGS)} "
          f"(GPT {sum(p.parent.name == 'gpt' for p in accepted)}, "
          f"BERT {sum(p.parent.name == 'bert' for p in accepted)})")
    print("| configs | refused at | reason |\n|---:|---|---|")
    for flag, hits in sorted(by_flag.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        reason = hits[0][1].split(": ", 1)[-1]
        print(f"| {len(hits)} | `{flag}` | {reason} |")
    print(coverage_line())
    if args.list:
        for flag, hits in sorted(by_flag.items()):
            for path, _ in hits:
                print(f"{flag}\t{path.parent.name}/{path.stem}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

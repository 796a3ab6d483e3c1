"""`python -m megapre.generate --load CKPT --prompt "..." [--max-new-tokens N --temperature T
--top-k K --top-p P --seed S | --greedy]`: sample text from a GPT checkpoint.

Runs in one process or under torchrun with tensor and/or pipeline parallelism
(`torchrun --nproc-per-node 2 -m megapre.generate --tensor-model-parallel-size 2 ...`); the
checkpoint loads in any layout, and the model, tokenizer and positions are the run's saved
config.json. Processes beyond TP x PP form data-parallel replicas that share out the batches of
prompts (the text does not depend on how many there are). A key/value cache feeds one new position per step (--no-kv-cache recomputes the
whole prefix each step instead). Generation stops at the end-of-document token (unless
--ignore-eod), after --max-new-tokens, or at the model's last position (--crop-context: slide
a window over the latest tokens instead). Prints the text (rank 0); --output-json also writes
the token ids.
Exit codes: 0 done, 2 bad input (the message names the flag or file), 1 anything else.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megapre.inference import checkpoint_io
from megapre.inference.generator import TextGenerator, generate_batches
from megapre.inference.sampling import SamplingConfig
from megapre.model.config import ConfigError
from megapre.train.runtime import build_runtime

from .common import (apply_common, autocast, checkpoint_parser, is_main_rank, run_cli,
                     write_json_atomic)


def build_parser() -> argparse.ArgumentParser:
    p = checkpoint_parser("megapre.generate", __doc__)
    g = p.add_argument_group("prompts and sampling")
    g.add_argument("--prompt", action="append", default=[],
                   help="prompt text (repeat for several; '' samples unconditionally)")
    g.add_argument("--prompt-file", type=Path,
                   help="one prompt per non-empty line; a .jsonl file holds one JSON string or "
                        "{\"prompt\": ...} per line (for prompts with newlines)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to add per prompt")
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely (0 = all)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus mass (1 = all)")
    g.add_argument("--greedy", action="store_true", help="always take the most likely token")
    g.add_argument("--seed", type=int, default=1234, help="sampling seed: same seed, same text (batch k of --batch-size prompts "
                        "draws from seed + k)")
    g.add_argument("--ignore-eod", action="store_true",
                   help="keep generating past the end-of-document token")
    g.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    g.add_argument("--crop-context", action="store_true",
                   help="past the model's last position, condition on the latest "
                        "--max-position-embeddings tokens (nanoGPT) instead of stopping")
    g.add_argument("--no-kv-cache", action="store_true",
                   help="recompute the whole prefix for every token (slower; the reference)")
    return p


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = [_utf8(p, f"--prompt #{i + 1}") for i, p in enumerate(args.prompt)]
    if args.prompt_file is not None:
        prompts += _prompt_file(args.prompt_file)
    if not prompts:
        raise ConfigError("no prompt: give --prompt TEXT (repeatable) or --prompt-file FILE")
    return prompts


def _utf8(text: str, where: str) -> str:
    """`text` unchanged if it is valid Unicode. Python hands over argv bytes that are not UTF-8
    as lone surrogates (U+DC80..U+DCFF), which the tokenizer cannot encode: name the byte."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start]
        byte = f"byte 0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF \
            else f"character U+{ord(bad):04X}"
        raise ConfigError(f"{where}: not valid UTF-8 text ({byte} at character {e.start}); "
                          "give the prompt in UTF-8 (e.g. convert it with iconv)") from None
    return text


def _read_prompt_file(path: Path) -> str:
    """The file's text; any readable file works (a pipe from <(...), /dev/stdin)."""
    if path.is_dir():
        raise ConfigError(f"--prompt-file {path}: is a directory, not a file")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"--prompt-file {path}: file not found") from None
    except OSError as e:
        raise ConfigError(f"--prompt-file {path}: cannot read it ({e.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"--prompt-file {path}: not UTF-8 text (byte 0x{data[e.start]:02x} at "
                          f"offset {e.start}); convert it to UTF-8") from None


def _prompt_file(path: Path) -> list[str]:
    lines = [x for x in _read_prompt_file(path).splitlines() if x.strip()]
    if not lines:
        raise ConfigError(f"--prompt-file {path}: holds no prompt (it is empty or only blank "
                          "lines); one prompt per line, or --prompt TEXT")
    if path.suffix != ".jsonl":
        return lines
    out = []
    for n, line in enumerate(lines, 1):
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--prompt-file {path}:{n}: not JSON ({e})") from None
        if isinstance(item, dict):
            item = item.get("prompt", item.get("text"))
        if not isinstance(item, str):
            raise ConfigError(f"--prompt-file {path}:{n}: expected a JSON string or an object "
                              "with a \"prompt\" string")
        out.append(item)
    return out


def _sampling(args: argparse.Namespace) -> SamplingConfig:
    try:
        return SamplingConfig(args.temperature, args.top_k, args.top_p, args.greedy)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check_args(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size} must be >= 1")
    if args.seed < 0:
        raise ConfigError(f"--seed {args.seed} must be >= 0")


def generate(args: argparse.Namespace) -> int:
    _check_args(args)
    sampling = _sampling(args)
    prompts = read_prompts(args)
    path = checkpoint_io.resolve(args.load, args.iteration)
    cfg = apply_common(checkpoint_io.saved_config(path), args)
    if cfg.model.model != "gpt":
        raise ConfigError(f"--load {args.load} holds a {cfg.model.model} checkpoint; "
                          "megapre.generate samples from GPT models (megapre.evaluate scores BERT)")
    cfg.parallel.sequence_parallel = False  # prefixes of any length: no sequence sharding
    rt = build_runtime(cfg)
    try:
        checkpoint_io.check_tokenizer(path, rt.tokenizer, args.allow_tokenizer_mismatch)
        info = checkpoint_io.load_weights(path, rt)
        learned = rt.model_cfg.position_embedding_type == "learned_absolute"
        gen = TextGenerator(rt.model, rt.tokenizer.vocab_size, rt.tokenizer.eod,
                            rt.model_cfg.max_position_embeddings if learned else None)
        ids = [rt.tokenizer.encode(p) for p in prompts]
        results = generate_batches(
            gen, ids, args.batch_size, args.max_new_tokens, sampling, args.seed,
            not args.ignore_eod, use_cache=not args.no_kv_cache, crop_context=args.crop_context,
            autocast=lambda: autocast(rt.device, cfg.train.bf16))
        if is_main_rank():
            _report(args, path, info, prompts, results, rt.tokenizer, sampling)
    finally:
        rt.close()
    return 0


def _report(args, path, info, prompts, results, tokenizer, sampling) -> None:
    samples = []
    for i, (prompt, r) in enumerate(zip(prompts, results)):
        text = tokenizer.decode(r.ids)
        full = tokenizer.decode(r.prompt_ids + r.ids) if prompt else text
        samples.append({"prompt": prompt, "prompt_ids": r.prompt_ids, "ids": r.ids,
                        "text": text, "stop_reason": r.stop_reason})
        if len(prompts) > 1:
            print(f"----- sample {i} ({len(r.ids)} tokens, stop: {r.stop_reason}) -----")
        print(full, flush=True)
        if r.stop_reason == "max_position_embeddings":
            print(f"megapre.generate: sample {i} stopped at the model's last position "
                  f"(--max-position-embeddings) after {len(r.ids)} new tokens; --crop-context "
                  "keeps going on the latest tokens", file=sys.stderr)
    if args.output_json is not None:
        write_json_atomic(args.output_json, {
            "checkpoint": str(path), "iteration": int(info["iteration"]), "seed": args.seed,
            "sampling": {"temperature": sampling.temperature, "top_k": sampling.top_k,
                         "top_p": sampling.top_p, "greedy": sampling.is_greedy},
            "max_new_tokens": args.max_new_tokens, "samples": samples})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("megapre.generate", lambda: generate(args))


if __name__ == "__main__":
    sys.exit(main())

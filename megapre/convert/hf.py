"""hf-import and hf-export: a Hugging Face directory <-> a megapre checkpoint.

Import builds the model once in one process (TP1, PP1), copies each tensor in, and saves an
iteration-0 checkpoint with its run config and tokenizer; the checkpoint then loads under any
layout (`--load`, `--finetune`, megapre.generate). Export loads a checkpoint in one process and
writes config.json, safetensors and tokenizer files."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

from megapre.model.config import ConfigError
from megapre.train.args import PretrainConfig, from_dict

from . import hf_files, hf_tokenizer
from .hf_families import family_for_export, family_of
from .vocab import unpadded, write_padded

# transformers classes for the export's config.json, by family
CONFIG_CLASSES = {"gpt2": "GPT2Config", "llama": "LlamaConfig", "bert": "BertConfig",
                  "megatron-bert": "MegatronBertConfig"}


@dataclasses.dataclass(frozen=True)
class ImportArgs:
    hf_dir: Path
    save: Path
    null_tokenizer: bool = False


def hf_import(args: ImportArgs) -> Path:
    """Convert; returns the checkpoint directory written."""
    hf = hf_files.read_config(args.hf_dir)
    family = family_of(hf, str(args.hf_dir / "config.json"))
    cfg = PretrainConfig()
    for key, value in family.model_args(hf).items():
        setattr(cfg.model, key, value)
    cfg.model.model = family.model
    cfg.train.device = "cpu"
    _refuse_existing(args.save)
    args.save.mkdir(parents=True, exist_ok=True)
    try:  # the tokenizer files first, then the checkpoint (itself written to a temporary name)
        _write_checkpoint(args, hf, family, cfg, args.save)
    except BaseException:
        shutil.rmtree(args.save, ignore_errors=True)  # it was new or empty: nothing is lost
        raise
    return args.save


def _refuse_existing(save: Path) -> None:
    if save.exists() and (not save.is_dir() or any(save.iterdir())):
        raise ConfigError(f"--save {save} already holds files; give a new directory (nothing "
                          "there is overwritten)")


def _write_checkpoint(args: ImportArgs, hf: dict, family, cfg: PretrainConfig,
                      save: Path) -> None:
    from megapre.data.tokenizers import build_tokenizer
    from megapre.train.checkpoint import save_checkpoint
    from megapre.train.runtime import build_runtime

    vocab = int(hf["vocab_size"])
    for key, value in hf_tokenizer.import_tokenizer(
            args.hf_dir, save, vocab if args.null_tokenizer else None).items():
        setattr(cfg.data, key, value)
    tokenizer = build_tokenizer(cfg.tokenizer_config())
    if tokenizer.vocab_size != vocab:
        raise ConfigError(f"{args.hf_dir}: the tokenizer has {tokenizer.vocab_size} tokens but "
                          f"the model's vocab_size is {vocab}; they must match (a tokenizer of "
                          "another model?)")
    from megapre.model import init

    with init.skipped():  # every weight is overwritten below
        rt = build_runtime(cfg, tokenizer=tokenizer)
    try:
        model = rt.model.models[0]
        _load_weights(args.hf_dir, hf, family, model, cfg)
        save_checkpoint(save, 0, rt.model, None, rt.mesh, config=cfg.to_dict(),
                        tracker=rt.tracker, tokenizer=tokenizer.describe(),
                        extra={"converted_from": {"hf_dir": str(args.hf_dir.resolve()),
                                                  "architecture": family.architecture}})
    finally:
        rt.mesh.destroy()


def _load_weights(hf_dir: Path, hf: dict, family, model: torch.nn.Module,
                  cfg: PretrainConfig) -> None:
    """Copy every family tensor into `model`; any parameter left unset or any tensor of the
    directory left unused is an error naming it."""
    params = dict(model.named_parameters())
    reader = hf_files.WeightReader(hf_dir, family.prefixes())
    done = set()
    for name, tensor in family.import_weights(
            hf, reader.take, cfg.model.untie_embeddings_and_output_weights):
        if name not in params:
            raise ConfigError(f"{hf_dir}: megapre's model has no {name} (family mapping and "
                              "model disagree)")
        write_padded(params[name], tensor, name, adopt=True)
        done.add(name)
    left = sorted(set(params) - done)
    if left:
        raise ConfigError(f"{hf_dir}: no weights for {', '.join(left[:5])}")
    unused = reader.unused()
    if unused:
        raise ConfigError(f"{hf_dir}: tensors this conversion does not understand: "
                          f"{', '.join(unused[:5])}{' ...' if len(unused) > 5 else ''}")


@dataclasses.dataclass(frozen=True)
class ExportArgs:
    load: Path
    hf_dir: Path
    iteration: int | None = None
    dtype: str = "fp32"  # fp32 | bf16 | fp16 weights in the safetensors files


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def hf_export(args: ExportArgs) -> tuple[Path, str | None]:
    """Write the checkpoint as a transformers directory; returns it and a note (or None)."""
    from megapre.inference import checkpoint_io
    from megapre.train.runtime import build_runtime

    path = checkpoint_io.resolve(str(args.load), args.iteration)
    cfg = checkpoint_io.saved_config(path)
    m = dataclasses.asdict(cfg.model)
    family = family_for_export(m)
    _single_process(cfg)
    from megapre.model import init

    with init.skipped():  # the checkpoint's weights replace them
        rt = build_runtime(cfg)
    try:
        checkpoint_io.load_weights(path, rt)
        model = rt.model.models[0]
        vocab = rt.tokenizer.vocab_size
        hf_cfg = family.hf_config(m, vocab)
        state = {n: unpadded(p.detach(), n, vocab) for n, p in model.named_parameters()}
        files, copies, note = hf_tokenizer.export_tokenizer(
            dataclasses.asdict(cfg.data), rt.tokenizer, hf_cfg.get(
                "n_positions", hf_cfg.get("max_position_embeddings")))
        files["config.json"] = _config_json(family, hf_cfg, rt.tokenizer, args.dtype)
        dtype = DTYPES[args.dtype]
        tensors = ((n, t.to(dtype)) for n, t in family.export_weights(m, state))
        hf_files.write_dir(args.hf_dir, files, tensors, copies)
    finally:
        rt.mesh.destroy()
    return args.hf_dir, note


def _single_process(cfg: PretrainConfig) -> None:
    p = cfg.parallel
    p.tensor_model_parallel_size = p.pipeline_model_parallel_size = 1
    p.context_parallel_size = 1
    p.num_distributed_optimizer_instances = 1  # training's optimizer layout: no optimizer here
    p.sequence_parallel = False
    p.even_pipeline()  # a run saved with virtual stages or an uneven split converts too
    cfg.train.device = "cpu"


def _config_json(family, hf_cfg: dict, tokenizer, dtype: str) -> bytes:
    """config.json through transformers' own config class, so the installed version reads it."""
    try:
        import transformers
    except ImportError as e:
        raise ConfigError("hf-export writes config.json with transformers: pip install "
                          "megapre[interop]") from e
    if family.model == "bert":
        ids = {"pad_token_id": getattr(tokenizer, "pad", None)}
    else:
        ids = {"bos_token_id": getattr(tokenizer, "bos", None) or tokenizer.eod,
               "eos_token_id": tokenizer.eod}
    config = getattr(transformers, CONFIG_CLASSES[family.name])(
        **hf_cfg, **{k: v for k, v in ids.items() if v is not None},
        architectures=[family.architecture],
        torch_dtype=str(DTYPES[dtype]).removeprefix("torch."))
    return (json.dumps(config.to_dict(), indent=1, default=str) + "\n").encode()


AUTO_CLASSES = {"ForPreTraining": "AutoModelForPreTraining", "ForMaskedLM": "AutoModelForMaskedLM"}


def auto_class(hf_dir: Path) -> str:
    """The transformers Auto class that loads an export (for the closing message)."""
    arch = json.loads((hf_dir / "config.json").read_text())["architectures"][0]
    return next((v for k, v in AUTO_CLASSES.items() if arch.endswith(k)), "AutoModelForCausalLM")


def saved_model_args(path: Path) -> dict:
    """The model section of a checkpoint's run config (for messages and tests)."""
    from megapre.inference import checkpoint_io

    return dataclasses.asdict(from_dict(json.loads(
        (checkpoint_io.resolve(str(path)) / "config.json").read_text())).model)

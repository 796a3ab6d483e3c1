"""megapre GPT checkpoints in EleutherAI's lm-evaluation-harness (`lm-eval`), registered as
model "megapre":

    megapre-lm-eval --model megapre --model_args load=CKPT --tasks lambada_openai --device cpu
    lm_eval.simple_evaluate(model=MegapreLM(load="CKPT"), tasks=[...])

The three request types run on megapre's own inference code, in the checkpoint's tokenizer:
- loglikelihood: context + continuation tokenized as the harness's TemplateLM does (whole text,
  then split at the context's tokens), truncated on the left to `max_length` + 1 tokens, scored
  by megapre.inference.logprobs (the training loss per token; greedy = every continuation token is
  the argmax). An empty context conditions on the end-of-document token.
- loglikelihood_rolling: the end-of-document token, then the text, scored with the sliding windows
  of megapre.inference.perplexity (window `max_length`, stride `stride`, default `max_length`:
  the harness's own rolling windows), so it equals `megapre.evaluate --text-file` on a file
  holding the same text.
- generate_until: megapre.inference.generator (KV cache); the prompt keeps its last
  `max_length - max_gen_toks` tokens, generation stops at the end-of-document token or after
  `max_gen_toks` tokens, and the text is cut at the first `until` string. Greedy unless the task
  asks for `do_sample` with a temperature > 0 (then seeded by `seed`).

Against `megapre.evaluate --text-file`: a rolling task whose one document is a file's text
(without edge whitespace) gives the same NLL and word perplexity (tests/inference/test_lm_eval.py).
The harness's built-in `wikitext` task differs on purpose: each Wikipedia article is its own
document (its own end-of-document start, context reset), the scored text is detokenized
(" @-@ " -> "-", " , " -> ", ", ...), and words are counted on the original article with
re.split(r"\\s+"), which also counts the empty strings at its edges. --text-file scores the file
as written, as one text, with str.split() words.

Layouts: one process by default. Under torchrun with `tensor_model_parallel_size` x
`pipeline_model_parallel_size` = WORLD_SIZE every rank runs the harness on the same requests
and the model answers alike on all of them (the harness itself writes results on LOCAL_RANK 0
only); data-parallel replicas are refused, the harness would not share requests out to them.

Only megapre.cli.lm_eval (the `megapre-lm-eval` console script) and users of the Python route
import this module; `import megapre` never needs lm_eval.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

import lm_eval.models  # noqa: F401  (the harness's own names stay available beside ours)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import simple_parse_args_string

from megapre.train.runtime import Runtime, build_runtime

from . import checkpoint_io
from .generator import TextGenerator, generate_batches
from .logprobs import TokenScorer
from .perplexity import check_stride, stream_perplexity
from .sampling import SamplingConfig

DEFAULT_MAX_GEN_TOKS = 256


def _device_name(device: str | None) -> str:
    """The harness's --device (default 'cuda:0', also on machines without a GPU) as megapre's
    auto/cpu/cuda: 'cuda...' without a visible GPU falls back to the CPU, with a warning."""
    if device is None or device == "auto":
        return "auto"
    if device == "cpu":
        return "cpu"
    if str(device).startswith("cuda"):
        if torch.cuda.is_available():
            return "cuda"  # each rank computes on its LOCAL_RANK's GPU (CUDA_VISIBLE_DEVICES)
        print(f"megapre lm-eval: device {device!r} but torch sees no GPU; running on the CPU",
              file=sys.stderr, flush=True)
        return "cpu"
    raise ValueError(f"megapre lm-eval: device {device!r} must be cpu, cuda[:N] or auto")


def _positive_int(name: str, value: Any) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or isinstance(value, bool):
        hint = " (batch_size=auto is not supported: give a number)" if name == "batch_size" else ""
        raise ValueError(f"megapre lm-eval: {name}={value!r} must be a positive integer{hint}")
    return n


@register_model("megapre")
class MegapreLM(TemplateLM):
    """A megapre GPT checkpoint (`load`: a --save directory or one iter_* inside it) for the
    harness; `max_length` defaults to the checkpoint's --seq-length."""

    def __init__(self, load: str, iteration: int | None = None, batch_size: int | str = 1,
                 max_length: int | None = None, device: str | None = "auto",
                 tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                 bf16: bool = False, stride: int | None = None, seed: int = 1234,
                 vocab_file: str | None = None, merge_file: str | None = None,
                 tokenizer_model: str | None = None, allow_tokenizer_mismatch: bool = False,
                 max_batch_size: int | None = None, **unused: Any) -> None:
        super().__init__()  # max_batch_size: the harness passes it; no automatic batch size
        if unused:
            raise ValueError(f"megapre lm-eval: unknown model argument(s) "
                             f"{', '.join(sorted(unused))}; see megapre/inference/lm_eval_model.py")
        self._batch_size = _positive_int("batch_size", batch_size)
        tp = _positive_int("tensor_model_parallel_size", tensor_model_parallel_size)
        pp = _positive_int("pipeline_model_parallel_size", pipeline_model_parallel_size)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world != tp * pp:
            raise ValueError(
                f"megapre lm-eval runs one model replica: WORLD_SIZE {world} must equal "
                f"tensor_model_parallel_size x pipeline_model_parallel_size = {tp * pp} (launch "
                f"`torchrun --nproc-per-node {tp * pp}`, or one process for TP = PP = 1)")
        path = checkpoint_io.resolve(str(load), None if iteration is None else int(iteration))
        cfg = checkpoint_io.saved_config(path)
        if cfg.model.model != "gpt":
            raise ValueError(f"megapre lm-eval scores text with a GPT; load={load} holds a "
                             f"{cfg.model.model} checkpoint")
        self._apply_job(cfg, tp, pp, _device_name(device), bf16,
                        {"vocab_file": vocab_file, "merge_file": merge_file,
                         "tokenizer_model": tokenizer_model})
        self.rt: Runtime = build_runtime(cfg)
        try:
            checkpoint_io.check_tokenizer(path, self.rt.tokenizer, bool(allow_tokenizer_mismatch))
            self.info = checkpoint_io.load_weights(path, self.rt)
            self._setup(cfg, max_length, stride, int(seed))
        except BaseException:
            self.rt.close()
            raise
        self._device = self.rt.device
        self.checkpoint = str(path)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None
                               ) -> "MegapreLM":
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None
                            ) -> "MegapreLM":
        """--model_args over the harness's own --batch_size/--device (which it always passes,
        defaults included): `--model_args load=X,batch_size=8` is not a duplicate argument."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **arg_dict})

    @staticmethod
    def _apply_job(cfg, tp: int, pp: int, device: str, bf16: Any, files: dict) -> None:
        """This job's layout, device, precision and tokenizer paths over the run's config."""
        p = cfg.parallel
        p.tensor_model_parallel_size, p.pipeline_model_parallel_size = tp, pp
        p.context_parallel_size = 1  # context parallelism is a pretraining layout
        p.even_pipeline()
        p.num_distributed_optimizer_instances = 1  # so is the optimizer's (none here)
        p.pipeline_schedule = "1f1b"
        p.sequence_parallel = False  # sequences of any length: no sequence sharding
        cfg.train.device = device
        cfg.train.bf16, cfg.train.fp16 = bf16 in (True, "True", "true", "1", 1), False
        for name, value in files.items():
            if value is not None:
                setattr(cfg.data, name, value)

    def _setup(self, cfg, max_length: int | None, stride: int | None, seed: int) -> None:
        tok, mcfg = self.rt.tokenizer, self.rt.model_cfg
        if tok.eod is None:
            raise ValueError(f"megapre lm-eval: the tokenizer {tok.name} has no end-of-document "
                             "token, which the harness conditions empty contexts on")
        learned = mcfg.position_embedding_type == "learned_absolute"
        positions = mcfg.max_position_embeddings if learned else None
        self._max_length = cfg.model.seq_length if max_length is None else \
            _positive_int("max_length", max_length)
        if positions is not None and self._max_length > positions:
            raise ValueError(f"megapre lm-eval: max_length={self._max_length} exceeds the "
                             f"model's {positions} learned positions")
        self.stride = self._max_length if stride is None else int(stride)
        check_stride(self.stride, self._max_length)
        self.seed = seed
        self.bf16 = cfg.train.bf16
        self.scorer = TokenScorer(self.rt.model)
        self.generator = TextGenerator(self.rt.model, tok.vocab_size, tok.eod, positions)

    # -- what the harness asks of a model ---------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.rt.tokenizer.eod

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.rt.tokenizer.name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs: Any) -> list[int]:
        return self.rt.tokenizer.encode(string)

    def tok_decode(self, ids: list[int]) -> str:
        return self.rt.tokenizer.decode(ids)

    def _autocast(self):
        if self.bf16:
            return torch.autocast(self.rt.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any
                              ) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), continuation is the greedy one) per request;
        batches of similar length (longest first), right-padded."""
        rows = []
        for i, (_, context, continuation) in enumerate(requests):
            if len(continuation) > self.max_length:
                raise ValueError(f"megapre lm-eval: a continuation of {len(continuation)} tokens "
                                 f"exceeds max_length={self.max_length}")
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]
            rows.append((i, whole, len(continuation)))
        rows.sort(key=lambda r: -len(r[1]))
        out: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
        for first in range(0, len(rows), self.batch_size):
            for i, answer in self._score_rows(rows[first:first + self.batch_size]):
                out[i] = answer
                self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
        return out

    def _score_rows(self, rows: list[tuple[int, list[int], int]]
                    ) -> list[tuple[int, tuple[float, bool]]]:
        width = max(len(whole) - 1 for _, whole, _ in rows)
        if width < 1:
            return [(i, (0.0, True)) for i, _, _ in rows]
        inputs = torch.zeros(len(rows), width, dtype=torch.long)
        targets = torch.zeros_like(inputs)
        for r, (_, whole, _) in enumerate(rows):
            ids = torch.tensor(whole, dtype=torch.long)
            inputs[r, :len(ids) - 1], targets[r, :len(ids) - 1] = ids[:-1], ids[1:]
        with self._autocast():
            scores = self.scorer(inputs, targets, greedy=True, everywhere=True)
        answers = []
        for r, (i, whole, n) in enumerate(rows):
            end = len(whole) - 1
            logprob = float(scores.logprobs[r, end - n:end].double().sum())
            answers.append((i, (logprob, bool(scores.greedy[r, end - n:end].all()))))
        return answers

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """log p(text | end-of-document), every token scored once by the sliding windows."""
        out = []
        for req in requests:
            (text,) = req.args
            ids = [self.prefix_token_id] + self.tok_encode(text)
            logprob = 0.0
            if len(ids) > 1:
                logprob = -stream_perplexity(self.scorer, ids, self.max_length, self.stride,
                                             self.batch_size, autocast=self._autocast).nll_sum
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), logprob)
            out.append(logprob)
        return out

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Continuations of each context, cut at the first `until` string; requests with the
        same generation settings run in batches."""
        groups: dict[str, list[int]] = {}
        settings = [self._gen_settings(req.args[1]) for req in requests]
        for i, s in enumerate(settings):
            groups.setdefault(repr(s), []).append(i)
        out = [""] * len(requests)
        for members in groups.values():
            until, max_new, sampling = settings[members[0]]
            keep = max(1, self.max_length - max_new)
            prompts = [self.tok_encode(requests[i].args[0])[-keep:] for i in members]
            gens = generate_batches(self.generator, prompts, self.batch_size, max_new, sampling,
                                    self.seed, autocast=self._autocast)
            for i, g in zip(members, gens):
                text = self.tok_decode(g.ids)
                for stop in until:
                    if stop:
                        text = text.split(stop)[0]
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    def _gen_settings(self, kwargs: dict | None) -> tuple[tuple[str, ...], int, SamplingConfig]:
        kw = dict(kwargs or {})
        until = kw.pop("until", None)
        if until is None:
            until = [self.tok_decode([self.eot_token_id])]
        elif isinstance(until, str):
            until = [until]
        max_new = _positive_int("max_gen_toks", kw.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
        temperature = float(kw.pop("temperature", 0.0) or 0.0)
        sample = bool(kw.pop("do_sample", False)) and temperature > 0
        sampling = SamplingConfig(temperature if sample else 1.0, int(kw.pop("top_k", 0) or 0),
                                  float(kw.pop("top_p", 1.0) or 1.0), greedy=not sample)
        return tuple(until), max_new, sampling

    def close(self) -> None:
        """Tear down the process group this model started (if any)."""
        self.rt.close()


"""The Hugging Face door's parity table: for GPT-2 and Llama models built from configs (random
weights x3, tokenizer trained on the spot), import with megapre-convert and compare megapre's
logits with transformers' in TP1, TP2 and PP2 (max |diff| / max |logit|), the one-batch loss,
and whether 32 greedy tokens agree (benchmarks/bench_convert.py times a 1.3B conversion). For
the BERT families (MegatronBertForPreTraining, BertForPreTraining; bert-base-uncased's WordPiece
from the shared data) the masked-LM logits of the real tokens of a padded sentence-pair batch,
the next-sentence logits (worst layout) and the pretraining loss (masked LM + next sentence).

    python benchmarks/hf_parity.py
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "convert"), str(ROOT / "tests"), str(ROOT)]

import test_hf_bert as bert  # noqa: E402
from hf_cases import BERT_KINDS, bert_dir, hf_dir  # noqa: E402
from test_hf_convert import _layout_logits, _open, _relative  # noqa: E402

from megapre.cli.convert import main as convert  # noqa: E402
from megapre.inference.generator import TextGenerator  # noqa: E402
from megapre.inference.logprobs import TokenScorer  # noqa: E402
from megapre.inference.sampling import SamplingConfig  # noqa: E402
from megapre.parallel.testing import run_distributed  # noqa: E402


def _one_process(ckpt: Path, model, ids: torch.Tensor) -> tuple[float, float, bool]:
    rt = _open(ckpt)
    try:
        logits = TokenScorer(rt.model).logits(ids)
        m = rt.model.models[0].eval()
        with torch.no_grad():
            loss = float(m(input_ids=ids[:, :-1], labels=ids[:, 1:]).mean())
        gen = TextGenerator(rt.model, rt.tokenizer.vocab_size, rt.tokenizer.eod, 64)
        ours = gen.generate([ids[0, :8].tolist()], 32, SamplingConfig(greedy=True), seed=0,
                            stop_at_eod=False)[0].ids
    finally:
        rt.mesh.destroy()
    with torch.no_grad():
        ref = model(ids)
        ref_loss = float(model(ids, labels=ids).loss)
        ref_gen = model.generate(ids[:1, :8], max_new_tokens=32, min_new_tokens=32,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)[0, 8:]
    return _relative(logits, ref.logits), abs(loss - ref_loss), ours == ref_gen.tolist()


def _bert_row(kind: str, work: Path) -> str:
    """MLM logits in TP1/TP2/PP2, NSP logits (worst of the three), pretraining loss |diff|."""
    model = bert_dir(kind, work / "hf", bert.BERT_VOCAB)
    assert convert(["hf-import", "--hf-dir", str(work / "hf"), "--save", str(work / "ck")]) == 0
    b = bert._batch(model.config.vocab_size)
    ref = bert._reference(model, b)
    real = b["real"].bool()
    rt = _open(work / "ck")
    try:
        got = {(1, 1): bert._logits(rt, b)}
        per_token, binary = rt.model.models[0].eval()(
            input_ids=b["ids"], tokentype_ids=b["types"], padding_mask=~real, labels=b["ids"])
    finally:
        rt.mesh.destroy()
    nsp = torch.tensor([0, 1])
    ours = float(per_token[real].mean() + torch.nn.functional.cross_entropy(binary, nsp))
    with torch.no_grad():
        theirs = float(model(b["ids"], token_type_ids=b["types"], attention_mask=b["real"],
                             labels=torch.where(real, b["ids"], -100),
                             next_sentence_label=nsp).loss)
    for tp, pp in ((2, 1), (1, 2)):
        got[(tp, pp)] = next(x for x in run_distributed(
            bert._layout_logits, 2, str(work / "ck"), tp, pp, b, backend=None, timeout_s=300)
            if x is not None)
    mlm = {k: _relative(v[0][real], ref[0][real]) for k, v in got.items()}
    worst_nsp = max(_relative(v[1], ref[1]) for v in got.values())
    return (f"| {kind} | {mlm[(1, 1)]:.1e} | {mlm[(2, 1)]:.1e} | {mlm[(1, 2)]:.1e} | "
            f"{abs(ours - theirs):.1e} | n/a (encoder) | {worst_nsp:.1e} |")


def main() -> int:
    print("| family | TP1 logits | TP2 logits | PP2 logits | loss |diff| | greedy 32 equal | "
          "NSP logits |")
    print("|---|---:|---:|---:|---:|---|---:|")
    for kind in ("gpt2", "llama"):
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            model = hf_dir(kind, work / "hf")
            assert convert(["hf-import", "--hf-dir", str(work / "hf"), "--save",
                            str(work / "ck")]) == 0
            ids = torch.randint(0, model.config.vocab_size, (2, 32),
                                generator=torch.Generator().manual_seed(7))
            rel1, dloss, same = _one_process(work / "ck", model, ids)
            with torch.no_grad():
                ref = model(ids).logits
            rel = {}
            for tp, pp in ((2, 1), (1, 2)):
                got = [x for x in run_distributed(_layout_logits, 2, str(work / "ck"), tp, pp,
                                                  ids, backend=None, timeout_s=300)
                       if x is not None]
                rel[(tp, pp)] = max(_relative(x, ref) for x in got)
        print(f"| {kind} | {rel1:.1e} | {rel[(2, 1)]:.1e} | {rel[(1, 2)]:.1e} | {dloss:.1e} | "
              f"{same} | n/a |", flush=True)
    for kind in BERT_KINDS:
        with tempfile.TemporaryDirectory() as tmp:
            print(_bert_row(kind, Path(tmp)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

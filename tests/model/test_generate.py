"""Text generation: the sampling math (greedy, temperature, top-k, top-p, padded columns, seeds),
the generator's batching and stopping rules against a plain argmax loop, and greedy decoding under
TP2 and PP2 (gloo, 2 processes) equal to one process, with and without the KV cache (whose
logits equal the full recompute), and prompt batches shared out over DP2 give one process's
samples. CLI tests on real checkpoints are in
test_generate_cli.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megapre.inference.generator import PromptTooLongError, TextGenerator, generate_batches
from megapre.inference.kv_cache import KVCache, stage_step
from megapre.inference.sampling import (SamplingConfig, filtered_logits, sample_next,
                                        top_k_filter, top_p_filter)
from megapre.model.config import TransformerConfig
from megapre.parallel import ParallelConfig, ParallelMesh
from megapre.train.parallel_model import ParallelModel

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 50  # real vocabulary; the model pads it to a multiple of 8 * TP


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- sampling math -------------------------------------------------------------------------------
def test_greedy_is_argmax_and_ignores_padding():
    logits = torch.randn(4, 64, generator=_gen())
    logits[:, 60:] = 100.0  # padded columns with the largest values
    got = sample_next(logits, SamplingConfig(greedy=True), 60, _gen())
    assert torch.equal(got, logits[:, :60].argmax(-1))
    got_t0 = sample_next(logits, SamplingConfig(temperature=0.0), 60, _gen())
    assert torch.equal(got_t0, got)


def test_padded_columns_never_sampled():
    logits = torch.zeros(2000, 16)
    logits[:, 12:] = 50.0
    got = sample_next(logits, SamplingConfig(temperature=5.0), 12, _gen())
    assert int(got.max()) < 12 and len(set(got.tolist())) == 12  # every real id is reachable


def test_top_k_keeps_exactly_k():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0, 2.5]])
    kept = torch.isfinite(top_k_filter(logits, 3))
    assert kept.tolist() == [[False, True, False, True, False, True]]
    draws = sample_next(logits.expand(3000, -1), SamplingConfig(top_k=3), 6, _gen())
    assert set(draws.tolist()) == {1, 3, 5}
    assert torch.equal(top_k_filter(logits, 0), logits)


def test_top_p_keeps_the_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    for p, keep in ((0.4, {1}), (0.7, {1, 3}), (0.8, {1, 3}), (0.81, {1, 3, 2}),
                    (1.0, {0, 1, 2, 3})):
        kept = set(torch.isfinite(top_p_filter(logits, p))[0].nonzero().flatten().tolist())
        assert kept == keep, p
    draws = sample_next(logits.expand(4000, -1), SamplingConfig(top_p=0.7), 4, _gen())
    freq = torch.bincount(draws, minlength=4).float() / 4000
    assert freq[0] == 0 and freq[2] == 0
    assert freq[1].item() == pytest.approx(0.5 / 0.8, abs=0.03)


def test_temperature_scales_the_distribution():
    logits = torch.tensor([[1.0, 0.0, -1.0]])
    for t in (0.5, 2.0):
        f = filtered_logits(logits, SamplingConfig(temperature=t), 3)
        assert torch.allclose(torch.softmax(f, -1), torch.softmax(logits / t, -1))
        draws = sample_next(logits.expand(6000, -1), SamplingConfig(temperature=t), 3, _gen(1))
        freq = torch.bincount(draws, minlength=3).float() / 6000
        assert torch.allclose(freq, torch.softmax(logits / t, -1)[0], atol=0.025)


def test_same_seed_same_samples():
    logits = torch.randn(8, 40, generator=_gen(3))
    cfg = SamplingConfig(temperature=1.3, top_k=20, top_p=0.9)
    a, b = (sample_next(logits, cfg, 40, _gen(7)) for _ in range(2))
    c = torch.stack([sample_next(logits, cfg, 40, _gen(s)) for s in range(8, 16)])
    assert torch.equal(a, b)
    assert not all(torch.equal(a, row) for row in c)


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 0.0), (0.7, 5, 0.0),
                                                      (1.3, 0, 0.9), (0.9, 0, 0.5)])
def test_matches_megatron_core_sampling(temperature, top_k, top_p):
    """Same filtered distribution as megatron-core's torch sampling, hence (same generator) the
    very same draws. Megatron uses top_p = 0 for 'off' and never combines top-k with top-p."""
    mod = pytest.importorskip(
        "megatron.core.inference.text_generation_controllers.text_generation_controller")

    class Controller:  # the sampling method only reads self.sampling_rng
        sampling_rng = _gen(9)

    logits = torch.randn(500, 50, generator=_gen(4)) * 3
    want = mod.TextGenerationController._torch_sampling_func(
        Controller(), logits.clone(), temperature, top_k, top_p)
    cfg = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p or 1.0)
    assert torch.equal(sample_next(logits, cfg, 50, _gen(9)), want)


@pytest.mark.parametrize("kw, flag", [({"temperature": -1.0}, "--temperature"),
                                      ({"top_k": -2}, "--top-k"), ({"top_p": 0.0}, "--top-p"),
                                      ({"top_p": 1.5}, "--top-p")])
def test_bad_sampling_settings_name_the_flag(kw, flag):
    with pytest.raises(ValueError, match=flag):
        SamplingConfig(**kw)


# -- the generator on a freshly initialized model ------------------------------------------------
def _model_cfg(**kw) -> TransformerConfig:
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=VOCAB,
                make_vocab_size_divisible_by=8, max_position_embeddings=24, seq_length=24,
                hidden_dropout=0.0, attention_dropout=0.0)
    return TransformerConfig(**{**base, **kw})


def _model(mesh: ParallelMesh, kind: str = "gpt", **kw) -> ParallelModel:
    return ParallelModel.build(kind, _model_cfg(**kw), mesh, seed=7)


@pytest.fixture(scope="module")
def single():
    mesh = ParallelMesh.single(device="cpu")
    return _model(mesh)


PROMPTS = [[3, 14, 15, 9, 2, 6], [27, 1], [8, 8, 8, 40]]


def _argmax_loop(model: ParallelModel, prompt: list[int], n: int, window: int = 10**9
                 ) -> list[int]:
    gpt = model.models[0]
    gpt.eval()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = gpt.gathered_logits(gpt(input_ids=torch.tensor([ids[-window:]])))
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_batch_equals_argmax_loop(single, use_cache):
    gen = TextGenerator(single, VOCAB, eod=None, max_positions=24)
    out = gen.generate(PROMPTS, 6, SamplingConfig(greedy=True), seed=0, use_cache=use_cache)
    assert len(out) == len(PROMPTS)
    for prompt, g in zip(PROMPTS, out):
        assert g.prompt_ids == prompt and g.stop_reason == "max_new_tokens"
        assert g.ids == _argmax_loop(single, prompt, 6)


@pytest.mark.parametrize("variant", [
    {}, {"position_embedding_type": "rope", "num_query_groups": 2, "activation": "swiglu",
         "normalization": "RMSNorm", "untie_embeddings_and_output_weights": True,
         "add_bias_linear": False},
    {"position_embedding_type": "rope", "rotary_interleaved": True, "qk_layernorm": True,
     "activation": "squared_relu", "layernorm_zero_centered_gamma": True},
    {"post_layernorm": True, "activation": "gelu_erf"}])
def test_kv_cache_logits_equal_full_recompute(variant):
    model = _model(ParallelMesh.single(device="cpu"), **variant)
    gpt = model.models[0]
    gpt.eval()
    ids = torch.randint(0, VOCAB, (3, 20), generator=_gen(2))
    with torch.no_grad():
        full = gpt(input_ids=ids)
        cache = KVCache()
        pieces = []
        for lo, hi in ((0, 7), (7, 8), (8, 9), (9, 20)):  # prefill, single steps, a chunk
            pieces.append(stage_step(gpt, cache, input_ids=ids[:, lo:hi]))
            cache.length = hi
    assert torch.allclose(torch.cat(pieces), full, atol=1e-5)
    gen = TextGenerator(model, VOCAB, None, 24)
    cached, plain = (gen.generate(PROMPTS, 5, SamplingConfig(greedy=True), 0, use_cache=c)
                     for c in (True, False))
    assert [g.ids for g in cached] == [g.ids for g in plain]


def test_sampling_is_reproducible_and_seed_dependent(single):
    gen = TextGenerator(single, VOCAB, eod=None, max_positions=24)
    cfg = SamplingConfig(temperature=1.5, top_k=30, top_p=0.95)
    a, b = (gen.generate(PROMPTS, 8, cfg, seed=11) for _ in range(2))
    c = gen.generate(PROMPTS, 8, cfg, seed=12)
    assert [g.ids for g in a] == [g.ids for g in b]
    assert [g.ids for g in a] != [g.ids for g in c]
    assert all(0 <= t < VOCAB for g in a for t in g.ids)


def test_stops_at_eod_and_at_last_position(single):
    greedy = SamplingConfig(greedy=True)
    first = TextGenerator(single, VOCAB, None, 24).generate([PROMPTS[0]], 1, greedy, 0)[0].ids[0]
    stopped = TextGenerator(single, VOCAB, eod=first, max_positions=24).generate(
        [PROMPTS[0]], 10, greedy, 0)[0]
    assert stopped.ids == [] and stopped.stop_reason == "eod"
    kept = TextGenerator(single, VOCAB, eod=first, max_positions=24).generate(
        [PROMPTS[0]], 3, greedy, 0, stop_at_eod=False)[0]
    assert kept.ids[0] == first and len(kept.ids) == 3
    near_end = TextGenerator(single, VOCAB, None, 24).generate([list(range(20))], 10, greedy, 0)[0]
    assert len(near_end.ids) == 4 and near_end.stop_reason == "max_position_embeddings"


@pytest.mark.parametrize("use_cache", [True, False])
def test_crop_context_slides_over_the_latest_tokens(single, use_cache):
    gen = TextGenerator(single, VOCAB, None, 24)
    prompts = [list(range(20)), list(range(30))]  # the second is longer than the positions
    out = gen.generate(prompts, 10, SamplingConfig(greedy=True), 0, use_cache=use_cache,
                       crop_context=True)
    assert len(out) == len(prompts)
    for prompt, g in zip(prompts, out):
        assert g.stop_reason == "max_new_tokens"
        assert g.ids == _argmax_loop(single, prompt, 10, window=24)


def test_bad_prompts(single):
    gen = TextGenerator(single, VOCAB, eod=None, max_positions=24)
    with pytest.raises(PromptTooLongError, match="24 positions.*--max-position-embeddings"):
        gen.generate([list(range(24))], 4, SamplingConfig(greedy=True), 0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        gen.generate([[VOCAB + 3]], 4, SamplingConfig(greedy=True), 0)
    with pytest.raises(ValueError, match="empty"):
        gen.generate([[]], 4, SamplingConfig(greedy=True), 0)
    unconditional = TextGenerator(single, VOCAB, eod=VOCAB - 1, max_positions=24).generate(
        [[]], 2, SamplingConfig(greedy=True), 0, stop_at_eod=False)[0]
    assert unconditional.prompt_ids == [VOCAB - 1] and len(unconditional.ids) == 2


def test_bert_is_refused():
    with pytest.raises(ValueError, match="GPT checkpoint"):
        TextGenerator(_model(ParallelMesh.single(device="cpu"), "bert"), VOCAB, None, 24)


# -- TP2 and PP2 equal one process (greedy) ------------------------------------------------------
def _batched(model: ParallelModel) -> list[list[int]]:
    """PROMPTS one per batch (batch k on replica k % DP), sampled with seeds 5, 6, 7."""
    gen = TextGenerator(model, VOCAB, eod=None, max_positions=24)
    return [g.ids for g in generate_batches(gen, PROMPTS, 1, 6, SamplingConfig(top_k=10), 5)]


def _worker(out: str) -> None:
    """torchrun entry: greedy generation of PROMPTS under TP2 and under PP2 (2 ranks each);
    batches shared out over DP2."""
    results = {"dp2": _batched(_model(ParallelMesh.init(ParallelConfig(), "cpu")))}
    for name, pc in (("tp2", ParallelConfig(tensor_parallel=2)),
                     ("pp2", ParallelConfig(pipeline_parallel=2))):
        mesh = ParallelMesh.init(pc, "cpu")
        gen = TextGenerator(_model(mesh), VOCAB, eod=None, max_positions=24)
        got = gen.generate(PROMPTS, 6, SamplingConfig(greedy=True), seed=0)
        plain = gen.generate(PROMPTS, 6, SamplingConfig(greedy=True), seed=0, use_cache=False)
        sampled = gen.generate(PROMPTS, 6, SamplingConfig(temperature=1.0), seed=5)
        results[name] = {"greedy": [g.ids for g in got], "no_cache": [g.ids for g in plain],
                         "sampled": [g.ids for g in sampled]}
    results["rank"] = int(os.environ["RANK"])
    Path(f"{out}.{results['rank']}").write_text(json.dumps(results))


@pytest.mark.slow
def test_tp2_and_pp2_greedy_equal_single_process(single, tmp_path):
    out = tmp_path / "gen.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", __file__, str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in (0, 1)]
    expected = [g.ids for g in TextGenerator(single, VOCAB, None, 24).generate(
        PROMPTS, 6, SamplingConfig(greedy=True), seed=0)]
    assert ranks[0]["dp2"] == ranks[1]["dp2"] == _batched(single)
    for layout in ("tp2", "pp2"):
        assert ranks[0][layout]["greedy"] == expected, layout
        assert ranks[0][layout]["no_cache"] == expected, layout
        assert ranks[0][layout] == ranks[1][layout], layout  # every rank holds the same text


if __name__ == "__main__":
    _worker(sys.argv[1])

"""Per-token log-probabilities of given next tokens under a GPT, in any tensor/pipeline layout:
what perplexity and the lm-eval adapter score text with.

The forward walks the pipeline stages in order (hidden states sent point to point, as in
generation), so sequences may have any length up to the model's positions and batches need no
fixed shape. On the last stage the sharded logits go through the training loss
(megapre.model.lm_head.token_loss, vocab-parallel cross entropy, no gather of the vocabulary), so a
token's log-probability is exactly minus the loss pretraining would report for it. The greedy flag
(is the target the most likely token?) gathers the logits over TP, and only when asked for.

Results live on the last pipeline stage (every TP rank there holds the same values); `everywhere`
hands them to every rank of the model replica, for callers that act on them on every rank.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megapre.model.lm_head import token_loss
from megapre.parallel.p2p import recv_tensor, send_tensor
from megapre.train.parallel_model import ParallelModel


@dataclass
class TokenScores:
    logprobs: torch.Tensor  # [b, s] float32: log p(target[:, t] | inputs[:, :t+1])
    greedy: torch.Tensor | None = None  # [b, s] bool: target[:, t] is the argmax there


class TokenScorer:
    """`scorer(inputs, targets)` -> TokenScores on the last pipeline stage, None elsewhere
    (every rank of the replica must call it with the same shapes: it is collective)."""

    def __init__(self, model: ParallelModel) -> None:
        if model.adapter.kind != "gpt":
            raise ValueError(f"token scoring needs a GPT checkpoint; this one is --model "
                             f"{model.adapter.kind}")
        self.model, self.mesh = model, model.mesh
        self.vocab_size = model.adapter.cfg.vocab_size
        self._by_stage = {spec.stage_index: m for spec, m in zip(model.specs, model.models)}
        self._num_stages = self.mesh.pp_size * (self.mesh.virtual_pipeline or 1)

    @property
    def is_scoring_rank(self) -> bool:
        """True on the one rank per replica whose scores count (last stage, TP rank 0)."""
        return self.mesh.is_last_stage and self.mesh.tp_rank == 0

    @torch.no_grad()
    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor, greedy: bool = False,
                 everywhere: bool = False) -> TokenScores | None:
        """Scores of `targets` [b, s] after each position of `inputs` [b, s] (token ids)."""
        if inputs.shape != targets.shape or inputs.dim() != 2:
            raise ValueError(f"inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} "
                             "must both be [batch, positions]")
        for chunk in self.model.chunks:
            chunk.eval()
        logits, model = self._forward(inputs)
        out = None
        if logits is not None:
            t = targets.to(logits.device)
            logprobs = -token_loss(logits, t, self.mesh, self.vocab_size).float()
            match = (model.gathered_logits(logits).argmax(-1) == t) if greedy else None
            out = TokenScores(logprobs.cpu(), None if match is None else match.cpu())
        if everywhere:
            out = self._broadcast(out, tuple(inputs.shape), greedy)
        return out

    @torch.no_grad()
    def logits(self, inputs: torch.Tensor) -> torch.Tensor | None:
        """Full-vocabulary logits [b, s, vocab] (padding columns dropped) of `inputs` [b, s] on
        the last pipeline stage, None on the others (collective over the replica)."""
        for chunk in self.model.chunks:
            chunk.eval()
        x, model = self._forward(inputs)
        return None if x is None else model.gathered_logits(x).float().cpu()

    def _forward(self, inputs: torch.Tensor):
        """Sharded logits [s, b, vocab/tp] and the last stage's model on the last stage,
        (None, None) on the others."""
        mesh, dev = self.mesh, self.mesh.device
        pp, ranks = mesh.pp_size, mesh.pp_ranks
        for s in range(self._num_stages):
            if s % pp != mesh.pp_rank:
                continue
            m = self._by_stage[s]
            ids = inputs.to(dev) if s == 0 else None
            hidden = None if s == 0 else recv_tensor(ranks[(s - 1) % pp], dev)
            x = m(input_ids=ids, hidden_states=hidden)
            if s == self._num_stages - 1:
                return x, m
            send_tensor(x, ranks[(s + 1) % pp])
        return None, None

    def _broadcast(self, scores: TokenScores | None, shape: tuple[int, int], greedy: bool
                   ) -> TokenScores:
        """The last stage's scores on every pipeline rank of this replica (TP ranks there hold
        equal values already)."""
        mesh = self.mesh
        if mesh.pp_size == 1:
            return scores
        dev = mesh.device
        buf = torch.zeros(2 if greedy else 1, *shape, dtype=torch.float32, device=dev)
        if scores is not None:
            buf[0] = scores.logprobs.to(dev)
            if greedy:
                buf[1] = scores.greedy.to(dev, torch.float32)
        src = mesh.rank_of(mesh.pp_size - 1, mesh.dp_rank, mesh.tp_rank)
        dist.broadcast(buf, src, group=mesh.pp_group)
        buf = buf.cpu()
        return TokenScores(buf[0], buf[1].bool() if greedy else None)

"""One optimizer step's forward and backward, behind one interface for the trainer.

  LocalStep     one model (one process, or expert parallel / FSDP2 under torchrun): the step's
                `grad_accum` micro-batches one after another, each loss / grad_accum backpropagated;
                optionally (`weights`, one process under bf16 autocast) with bf16 compute copies of
                the weights cast once per step and fp32 gradient sums (train/optim.py's
                ComputeWeights); without it, the reference path: autocast casts at every use
  PipelineStep  parallel.pp > 1: one schedule step runs the same micro-batches through the stages,
                forward and backward (torch.distributed.pipelining, parallel/pipeline.py)

Both offer `run(batches) -> StepStats` (the micro-batches of one step in; gradients accumulated in
the parameters; the detached loss terms, means over the micro-batches, out) and `eval_sums(batches)`
for validation (the sum of the LM loss over the predicted tokens, and their count). Clipping, the
finiteness check and the optimizer step are the trainer's, the same for both.

A micro-batch is a token tensor [B, L] (pretraining: every next token is a target) or an SFTBatch
(deepseekmoe/data/sft.py: labels, positions and a per-document mask, `model(**batch.model_kwargs())`;
only assistant tokens carry loss). SFT micro-batches hold different numbers of target tokens, so
each one's mean loss is weighted by its share of the step's targets (not 1/grad_accum): the step
minimises the mean over all its assistant tokens, however the rows are cut into micro-batches;
under data parallelism `target_mean` (the mean of this step's target count over the ranks) makes
it the mean over every rank's tokens, as one process with the whole batch computes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the pipelining stack costs about a second to import; one-process runs skip it
    from deepseekmoe.parallel.pipeline import Pipeline
    from deepseekmoe.train.metrics import ExpertLoad
    from deepseekmoe.train.optim import ComputeWeights


@dataclass
class StepStats:
    """The detached loss terms of one optimizer step (means over its micro-batches): the trained
    objective `loss` = `lm` + `balance`, and the balance loss's expert- and device-level parts
    (0 when a term is off)."""

    loss: torch.Tensor
    lm: torch.Tensor
    balance: torch.Tensor
    expert: torch.Tensor
    device: torch.Tensor

    @classmethod
    def zeros(cls, device: torch.device) -> StepStats:
        return cls(*(torch.zeros((), device=device) for _ in range(5)))

    def stacked(self) -> torch.Tensor:
        return torch.stack([self.loss, self.lm, self.balance, self.expert, self.device])

    @classmethod
    def from_stacked(cls, t: torch.Tensor) -> StepStats:
        return cls(*t)

    def add(self, out, n: int) -> None:
        """Add one micro-batch's ModelOutput, weighted 1/n (in place, on the device)."""
        self.loss += out.loss.detach().float() / n
        self.lm += out.lm_loss.detach().float() / n
        for mine, term in ((self.balance, out.balance_loss), (self.expert, out.expert_balance_loss),
                           (self.device, out.device_balance_loss)):
            if term is not None:
                mine += term.detach().float() / n


def forward(model: torch.nn.Module, x):
    """The ModelOutput of one micro-batch (a token tensor or an SFTBatch) and its number of targets."""
    if isinstance(x, torch.Tensor):
        return model(x, labels=x), x.shape[0] * (x.shape[1] - 1)
    return model(**x.model_kwargs()), x.num_label_tokens


def divided(batches, accum: int, target_mean=None):
    """(micro-batch, divisor of its loss) for the step's micro-batches: `accum` for token tensors
    (read one at a time, as they are used); for SFT batches, (the step's targets / this batch's),
    which needs the whole step's batches up front (their labels are small). `target_mean(t)`: the
    mean of t over the data-parallel ranks, whose gradients are averaged: with it the divisor is
    (all ranks' targets / ranks) / this batch's."""
    it = iter(batches)
    first = next(it, None)
    if first is None:
        return
    if isinstance(first, torch.Tensor):
        yield first, accum
        yield from ((x, accum) for x in it)
        return
    group = [first, *it]
    total = sum(b.num_label_tokens for b in group)
    if target_mean is not None:
        total = float(target_mean(torch.tensor(float(total), dtype=torch.float64, device=first.input_ids.device)))
    # A batch without targets has a NaN mean loss: the step is then skipped as non-finite.
    yield from ((b, total / b.num_label_tokens if b.num_label_tokens else float("inf")) for b in group)


class LocalStep:
    """Gradient accumulation over the step's micro-batches on one model."""

    def __init__(self, model: torch.nn.Module, accum: int, autocast, load: ExpertLoad, device: torch.device,
                 weights: ComputeWeights | None = None):
        self.model, self.accum, self.autocast, self.load, self.device = model, accum, autocast, load, device
        self.target_mean = None  # SFT under data parallelism: Runtime.mean (see divided)
        self.weights = weights  # bf16 compute copies for the step (None: autocast casts at each use)

    def run(self, batches) -> StepStats:
        stats = StepStats.zeros(self.device)
        if self.weights is not None:
            self.weights.begin()
        try:
            for x, div in divided(batches, self.accum, self.target_mean):
                with self.autocast():
                    out, _ = forward(self.model, x)
                (out.loss / div).backward()
                stats.add(out, div)
                if self.load:
                    self.load.update()
        finally:
            if self.weights is not None:
                self.weights.end()
        return stats

    def eval_sums(self, batches) -> tuple[torch.Tensor, int]:
        total, count = torch.zeros((), dtype=torch.float64, device=self.device), 0
        for x in batches:
            x = x.to(self.device)
            with self.autocast():
                out, n = forward(self.model, x)
            if n:  # an SFT batch without assistant tokens adds nothing (its mean would be NaN)
                total += out.lm_loss.double() * n
                count += n
        return total, count


class PipelineStep:
    """One schedule step over the step's micro-batches (`accum` of `micro` rows each); the
    gradients are their mean, as under gradient accumulation."""

    def __init__(self, pipe: Pipeline, accum: int, autocast, load: ExpertLoad, device: torch.device):
        self.pipe, self.accum, self.autocast, self.load, self.device = pipe, accum, autocast, load, device

    def run(self, batches) -> StepStats:
        x = torch.cat(list(batches))
        with self.autocast():
            st = self.pipe.step(x, x)  # the same on every rank of the pipeline
        if self.load:
            self.load.update(last=self.accum)
        return StepStats(st["loss"], st["lm_loss"], st["balance_loss"], st["expert_balance_loss"],
                         st["device_balance_loss"])

    def eval_sums(self, batches) -> tuple[torch.Tensor, int]:
        total, count = torch.zeros((), dtype=torch.float64, device=self.device), 0
        for xs in _groups(batches, self.accum):  # the batches of one forward-only schedule step
            x = torch.cat(xs).to(self.device)
            with self.autocast():
                loss = self.pipe.eval_loss(x, x, len(xs))
            if loss is not None:  # the last stage's ranks hold the loss; the others add 0
                n = x.shape[0] * (x.shape[1] - 1)
                total += loss.double() * n
                count += n
        return total, count


def _groups(batches, n: int):
    """Consecutive batches in lists of up to n of one shape (a short last batch goes alone)."""
    group: list[torch.Tensor] = []
    for x in batches:
        if group and (len(group) == n or x.shape != group[0].shape):
            yield group
            group = []
        group.append(x)
    if group:
        yield group

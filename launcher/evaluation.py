"""Validation during and after training: loss, and accuracy and macro-F1 for classification, reduced
over every rank; early stopping on a watched metric. A component: the loop calls it."""

from __future__ import annotations

import torch
import torch.distributed as dist

from launcher.data import Examples
from launcher.methods import eval_mode
from launcher.spec import JobSpec
from strategies.base import RankContext


class EarlyStopping:
    """Stop when the watched validation metric has not improved for `patience` evaluations."""

    def __init__(self, metric: str, patience: int | None) -> None:
        self.metric, self.patience = metric, patience
        self.best: float | None = None
        self.since_best = 0
        self.stopped = False

    def should_stop(self, metrics: dict) -> bool:
        if self.patience is None:
            return False
        value = metrics[self.metric] if self.metric == "val_loss" else -metrics[self.metric]
        if self.best is None or value < self.best:
            self.best, self.since_best = value, 0
        else:
            self.since_best += 1
        self.stopped = self.since_best >= self.patience
        return self.stopped

    def describe(self) -> str:
        best = self.best if self.metric == "val_loss" else -self.best
        return f"{self.metric} has not improved on {best:.4f} for {self.patience} evaluations"


@torch.no_grad()
def evaluate(
    spec: JobSpec, model: torch.nn.Module, examples: Examples, ctx: RankContext, group: dist.ProcessGroup | None = None
) -> dict[str, float]:
    """Validation loss, and next-token accuracy on the supervised tokens (causal LM) or accuracy and macro-F1
    (classification), over the whole validation file; the
    sums are reduced as CPU tensors on `group` (the runtime's gloo control group).

    Every rank runs the same number of forwards (ranks with fewer examples repeat one with weight 0):
    DDP and FSDP2 forwards are collectives, and an uneven count would hang the job.
    """
    total = len(examples["input_ids"])
    mine = list(range(ctx.rank, total, ctx.world_size))
    per_rank = -(-total // ctx.world_size)
    mb = spec.train.micro_batch_size
    n_batches = -(-per_rank // mb)
    num_labels = spec.task.num_labels or 0
    confusion = torch.zeros(max(num_labels, 1), max(num_labels, 1), dtype=torch.float64)
    sums = torch.zeros(4, dtype=torch.float64)  # loss * count, count; causal LM: next tokens right, supervised
    with eval_mode(model):
        for i in range(n_batches):
            take = mine[i * mb : (i + 1) * mb]
            weight = len(take)
            batch = {name: t[take or [0]].to(ctx.device) for name, t in examples.items()}
            with ctx.autocast():
                out = model(**batch)
            sums[:2] += torch.tensor([out.loss.float().item() * weight, weight], dtype=torch.float64)
            if not num_labels and weight:  # teacher-forced next-token accuracy on the supervised tokens
                labels = batch["labels"][:, 1:]
                predicted = out.logits[:, -batch["labels"].shape[1] :][:, :-1].argmax(-1)  # prompt tuning prepends
                supervised = labels != -100
                sums[2:] += torch.tensor([(predicted == labels)[supervised].sum().item(), supervised.sum().item()], dtype=torch.float64)
            if num_labels and weight:
                pred = out.logits.argmax(-1).cpu()
                for y, yhat in zip(batch["labels"].cpu().tolist(), pred.tolist()):
                    confusion[y, yhat] += 1
    dist.all_reduce(sums, group=group)
    metrics = {"val_loss": (sums[0] / sums[1].clamp(min=1)).item()}
    if not num_labels:
        metrics["token_accuracy"] = (sums[2] / sums[3].clamp(min=1)).item()
    if num_labels:
        dist.all_reduce(confusion, group=group)  # summed counts across ranks; torchmetrics would need the same
        metrics.update(classification_metrics(confusion))
    return metrics


def classification_metrics(confusion: torch.Tensor) -> dict[str, float]:
    """Accuracy and macro-F1 (mean over classes present in labels or predictions) from a confusion matrix."""
    true_pos = confusion.diag()
    support, predicted = confusion.sum(1), confusion.sum(0)
    present = (support + predicted) > 0
    f1 = 2 * true_pos / (support + predicted).clamp(min=1)
    return {
        "accuracy": (true_pos.sum() / confusion.sum().clamp(min=1)).item(),
        "macro_f1": f1[present].mean().item() if present.any() else 0.0,
    }

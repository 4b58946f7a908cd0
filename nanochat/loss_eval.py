"""
Loss in bits per byte (bpb): the tokenizer-independent measure of a language model.

bpb = (sum over predicted tokens of the cross-entropy in nats) / (ln 2 * sum of their UTF-8 bytes).
Special tokens (<|bos|> ...) have 0 bytes and are left out of both sums, so a model cannot gain
by predicting document boundaries.
"""

import math

import torch
import torch.distributed as dist


def _all_reduce_sum(*tensors):
    if dist.is_available() and dist.is_initialized():
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes):
    """
    model(x, y, loss_reduction="none") -> fp32 [B, T] nats. batches: iterator of (x, y) int64 [B, T].
    steps: number of batches to use (per rank). token_bytes: int32 [vocab_size] on the model's
    device. Returns bpb as a float, summed over all ranks when distributed.
    """
    device = token_bytes.device
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    for _ in range(steps):
        x, y = next(batches)
        nats = model(x, y, loss_reduction="none").view(-1)
        y = y.view(-1)
        valid = y >= 0
        nbytes = torch.where(valid, token_bytes[y.clamp(min=0)], torch.zeros_like(y, dtype=token_bytes.dtype))
        counted = nbytes > 0
        total_nats += nats[counted].double().sum()
        total_bytes += nbytes.sum()
    _all_reduce_sum(total_nats, total_bytes)
    if total_bytes.item() == 0:
        return float("inf")
    return total_nats.item() / (math.log(2) * total_bytes.item())


class UnigramBaseline:
    """
    The bpb of the best context-free model: token frequencies counted on the training tokens the
    model saw (add-one smoothed), scored on validation tokens. A trained model must beat it clearly.
    """

    def __init__(self, vocab_size, device="cpu"):
        self.counts = torch.zeros(vocab_size, dtype=torch.float64, device=device)

    def update(self, targets):
        """targets: int64 [B, T] training targets (-1 ignored)."""
        t = targets[targets >= 0].view(-1)
        self.counts += torch.bincount(t, minlength=self.counts.numel()).to(self.counts)

    @torch.no_grad()
    def evaluate_bpb(self, batches, steps, token_bytes):
        counts = self.counts.clone()
        _all_reduce_sum(counts)
        log_probs = torch.log(counts + 1.0) - math.log(counts.sum().item() + counts.numel())
        total_nats, total_bytes = 0.0, 0
        for _ in range(steps):
            _, y = next(batches)
            y = y.view(-1)
            y = y[y >= 0].to(counts.device)
            nbytes = token_bytes.to(counts.device)[y]
            keep = nbytes > 0
            total_nats += -log_probs[y[keep]].sum().item()
            total_bytes += nbytes.sum().item()
        t = torch.tensor([total_nats, float(total_bytes)], dtype=torch.float64, device=counts.device)
        _all_reduce_sum(t)
        return t[0].item() / (math.log(2) * t[1].item())


@torch.no_grad()
def evaluate_loss(model, batches, device):
    """
    Mean cross-entropy in nats per trained token (targets >= 0) over every batch of `batches` (an
    iterable of (x, y) int64 [B, T]), summed over all ranks when distributed. Returns a float
    (nan when there is no trained token).
    """
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    for x, y in batches:
        total += model(x, y, loss_reduction="sum").double()
        count += (y >= 0).sum()
    _all_reduce_sum(total, count)
    return (total / count).item() if count.item() else float("nan")

"""Training objectives. The contract every objective keeps, so that every token weighs the same:

    loss_fn(model, batch) -> (summed_loss, scored)

`summed_loss` is the SUM of the per-target losses in the micro-batch (a 0-dim float tensor) and
`scored` the number of targets it summed over (an int or a 0-dim integer tensor). Ignored targets
(-100) are in neither. The trainer adds both over the accumulation window and over the ranks and
divides once, so a micro-batch with few scored tokens (SFT with assistant-only targets, masked LM,
padded classification) counts for exactly its share; a per-micro-batch mean would not.
`input_tokens(batch)` says how many tokens a batch fed the model (throughput and MFU count those).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def input_tokens(batch: Any) -> int:
    """Return the tokens a batch feeds the model: real (unpadded) tokens where lengths are known.

    (x, y) tuples count x; dicts count `attention_mask` or `lengths` if present, else `input_ids`.
    """
    if isinstance(batch, torch.Tensor):
        return batch.numel()
    if isinstance(batch, tuple | list):
        return input_tokens(batch[0])
    if isinstance(batch, dict):
        for key in ("attention_mask", "lengths"):
            if key in batch:
                return int(batch[key].sum())
        return input_tokens(batch["input_ids"])
    raise TypeError(f"cannot count the tokens of a {type(batch).__name__} batch")


# Rows of logits the fused head loss holds at a time: 512 x V fp32 (8 MB at V = 4,096) stays in
# the last-level cache while its softmax, its gradient and the two products that use it run.
HEAD_CHUNK_ROWS = 512


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of logits = h @ w.T against y, in row chunks; (N, V) never stored.

    h (N, C) fp32, w (V, C) fp32, y (N,) with -100 ignored. For each chunk of rows the logits are
    formed, turned into their gradient (softmax - one-hot; all zero on ignored rows) and multiplied
    into dL/dh and dL/dw at once, so forward also does backward's two products and backward only
    scales them by the incoming gradient. The same maths as `F.cross_entropy(h @ w.T, y,
    reduction="sum")`; what it saves is writing the logits and their gradient out to memory and
    reading them back (64 MB each for 16 x 256 tokens at V = 4,096).
    """

    @staticmethod
    def forward(ctx, h, w, y):
        loss = h.new_zeros(())
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(w) if ctx.needs_input_grad[1] else None
        for i in range(0, h.shape[0], HEAD_CHUNK_ROWS):
            hc, yc = h[i : i + HEAD_CHUNK_ROWS], y[i : i + HEAD_CHUNK_ROWS]
            logits = hc @ w.T  # (n, V)
            lse = torch.logsumexp(logits, dim=-1)  # (n,)
            valid = yc != IGNORE_INDEX
            target = torch.where(valid, yc, 0).unsqueeze(1)  # (n, 1)
            picked = logits.gather(1, target).squeeze(1)
            loss += torch.where(valid, lse - picked, 0.0).sum()
            # softmax in place; an ignored row subtracts +inf, so its gradient row is all zero
            probs = logits.sub_(torch.where(valid, lse, float("inf")).unsqueeze(1)).exp_()
            probs.scatter_add_(1, target, -valid.to(probs.dtype).unsqueeze(1))  # - one-hot
            if grad_h is not None:
                torch.mm(probs, w, out=grad_h[i : i + HEAD_CHUNK_ROWS])
            if grad_w is not None:
                grad_w.addmm_(probs.T, hc)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad):
        grad_h, grad_w = ctx.saved_tensors
        return (
            None if grad_h is None else grad_h * grad,
            None if grad_w is None else grad_w * grad,
            None,
        )


def _fused_head(model: nn.Module) -> bool:
    """True when `causal_lm_loss` may run the head and the loss fused (`_LinearCrossEntropy`).

    Only for training a bare fp32 `LlamaForCausalLM` with a plain bias-free head and no autocast;
    wrapped models (DDP, FSDP, adapters, torch.compile'd modules) take the ordinary path, since
    their forward (hooks, sharded or wrapped weights) must run whole. Not under torch.compile
    either: inductor fuses the plain head and loss itself, and timed no slower than this there
    (docs/performance.md, 2026-12-01).
    """
    from fmforge.model.llama import LlamaForCausalLM

    if torch.compiler.is_compiling():
        return False
    if type(model) is not LlamaForCausalLM or not torch.is_grad_enabled():
        return False
    head = model.lm_head
    return (
        type(head) is nn.Linear
        and head.bias is None
        and head.weight.dtype == torch.float32
        and not torch.is_autocast_enabled(head.weight.device.type)
    )


def causal_lm_loss(
    model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token prediction: summed cross-entropy of logits(x) against y = x shifted by one.

    batch: x, y int64 (B, T). Targets y == -100 are ignored (loss masks) and not counted.
    """
    x, y = batch
    if _fused_head(model):
        hidden = model(x, return_hidden=True)  # (B, T, C)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        loss = _LinearCrossEntropy.apply(hidden, model.lm_head.weight, y.reshape(-1))
        return loss, (y != IGNORE_INDEX).sum()
    logits = model(x)  # (B, T, V)
    loss = F.cross_entropy(
        logits.view(-1, logits.size(-1)).float(),
        y.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, (y != IGNORE_INDEX).sum()


def classification_loss(
    model: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over class scores; one scored target per example.

    batch: input_ids (B, T) right-padded, lengths (B,), labels (B,) class indices. The model maps
    (input_ids, lengths) to scores (B, L) (a head's logits or label-word log-likelihoods; for label
    words this is PET's verbalizer-token loss).
    """
    scores = model(batch["input_ids"], batch["lengths"])  # (B, L)
    loss = F.cross_entropy(scores.float(), batch["labels"], reduction="sum")
    return loss, int(batch["labels"].numel())


# --- encoder objectives: masked LM (BERT) and contrastive InfoNCE (SimCSE) ----------------------


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    special_ids: list[int] | set[int],
    mask_id: int,
    vocab_size: int,
    generator: torch.Generator,
    probability: float = 0.15,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: return (inputs, labels), each (B, T).

    Each real non-special token is chosen with `probability`; a chosen token becomes [MASK] 80% of
    the time, a random non-special token 10%, and stays itself 10%. labels hold the original id at
    chosen positions and -100 elsewhere; special tokens and padding are never chosen. The same
    generator state gives the same masks.
    """
    special = torch.tensor(sorted(special_ids), dtype=input_ids.dtype)
    eligible = attention_mask.bool() & ~torch.isin(input_ids, special)  # (B, T)
    draws = torch.rand(input_ids.shape, generator=generator)  # (B, T): one per decision
    chosen = eligible & (torch.rand(input_ids.shape, generator=generator) < probability)
    labels = input_ids.masked_fill(~chosen, IGNORE_INDEX)
    to_mask = chosen & (draws < 0.8)
    to_random = chosen & (draws >= 0.8) & (draws < 0.9)
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[special] = False
    candidates = allowed.nonzero().squeeze(1)  # ids a random replacement may take
    picks = candidates[torch.randint(len(candidates), input_ids.shape, generator=generator)]
    inputs = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    inputs = torch.where(to_random, picks, inputs)
    return inputs, labels


def masked_lm_loss(
    model: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked-LM: summed cross-entropy at the chosen positions only, and how many there were.

    batch: input_ids (B, T) after `mask_tokens`, attention_mask (B, T), labels (B, T) with -100
    where nothing is predicted. The vocabulary projection runs only on the scored rows.
    """
    labels = batch["labels"]
    scored = labels != IGNORE_INDEX  # (B, T)
    logits = model(batch["input_ids"], batch["attention_mask"], positions=scored)  # (N, V)
    loss = F.cross_entropy(logits.float(), labels[scored], reduction="sum")
    return loss, scored.sum()


def info_nce(
    anchors: torch.Tensor, positives: torch.Tensor, temperature: float = 0.05
) -> torch.Tensor:
    """Return the summed InfoNCE loss of (B, C) anchors against (B, C) positives.

    Row i's positive is positives[i]; every other row of the batch is a negative (in-batch
    negatives). Similarity is cosine divided by the temperature (0.05: scale 20).
    """
    a = F.normalize(anchors.float(), dim=-1)
    p = F.normalize(positives.float(), dim=-1)
    scores = a @ p.T / temperature  # (B, B)
    targets = torch.arange(len(a), device=a.device)
    return F.cross_entropy(scores, targets, reduction="sum")


def info_nce_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], temperature: float = 0.05
) -> tuple[torch.Tensor, int]:
    """Contrastive InfoNCE over sentence embeddings (mean pooling, then the projection head if
    the model has one); one scored pair per example.

    batch: input_ids/attention_mask (B, T) for the anchors and, for supervised pairs,
    pair_input_ids/pair_attention_mask (B, T') for their positives. Without a pair the anchors are
    their own positives through a second forward pass with an independent dropout mask
    (unsupervised SimCSE), run as one (2B, T) batch.
    """
    from fmforge.model.heads import sentence_embedding

    ids, mask = batch["input_ids"], batch["attention_mask"]
    b = ids.shape[0]
    if "pair_input_ids" in batch:
        anchors = sentence_embedding(model, ids, mask)  # (B, D)
        pair_mask = batch["pair_attention_mask"]
        positives = sentence_embedding(model, batch["pair_input_ids"], pair_mask)
    else:
        both_ids, both_mask = torch.cat([ids, ids]), torch.cat([mask, mask])  # (2B, T)
        pooled = sentence_embedding(model, both_ids, both_mask)  # (2B, D)
        anchors, positives = pooled[:b], pooled[b:]
    return info_nce(anchors, positives, temperature), b

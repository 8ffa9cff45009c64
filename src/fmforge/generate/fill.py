"""Fill in the blank: a masked-LM encoder's top-k tokens for each mask in a text.

"I heard [MASK] from the teacher." -> the model's most likely words for the blank, with
probabilities, as `transformers.pipeline("fill-mask")` reports them. The mask is written as the
tokenizer's mask token ("[MASK]" for WordPiece); fmforge splits the text at it and inserts the
mask id itself, since plain text never encodes to a special id.
"""

from __future__ import annotations

from typing import Any

import torch

from fmforge.errors import UserError
from fmforge.generate.embed import max_input_tokens
from fmforge.model.heads import BertForMaskedLM


def mask_token(loaded: Any) -> str:
    """Return the spelling of the model's mask token (the blank in `fill` input)."""
    tokenizer = loaded.tokenizer
    if tokenizer is None or tokenizer.mask_id is None:
        raise UserError(f"{loaded.source or 'this model'}: its tokenizer has no mask token")
    return tokenizer.roles["mask"]


def encode_with_masks(loaded: Any, text: str) -> list[int]:
    """Return the framed ids of `text` with each mask spelling replaced by the mask id."""
    tokenizer = loaded.tokenizer
    spelling = mask_token(loaded)
    pieces = text.split(spelling)
    if len(pieces) < 2:
        raise UserError(f"the text has no {spelling} to fill: {text!r}")
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        if i:
            ids.append(tokenizer.mask_id)
        ids += tokenizer.encode(piece)
    limit = max_input_tokens(loaded)
    if len(ids) + 2 > limit:
        raise UserError(f"the text is {len(ids) + 2} tokens; this model reads at most {limit}")
    return tokenizer.frame(ids, limit)


@torch.no_grad()
def fill_mask(loaded: Any, text: str, top_k: int = 5) -> list[list[dict[str, Any]]]:
    """Return, for each mask in `text` (left to right), its top_k fillers.

    Each filler: {"token": the decoded word piece, "token_id", "score": probability,
    "sequence": the text with this mask filled}.
    """
    model = loaded.model
    if not isinstance(model, BertForMaskedLM):
        raise UserError(
            f"{loaded.source or 'this model'} has no masked-LM head, so it cannot fill blanks "
            "(sentence encoders such as minilm-l6 only embed); train one with "
            "`fmforge pretrain --objective mlm`"
        )
    if top_k < 1:
        raise UserError(f"--top-k must be >= 1, got {top_k}")
    tokenizer = loaded.tokenizer
    ids = encode_with_masks(loaded, text)
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)  # (1, T)
    positions = x == tokenizer.mask_id  # (1, T)
    probs = model(x, positions=positions).float().softmax(-1)  # (M, V)
    top = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    spelling = mask_token(loaded)
    results = []
    for m in range(probs.shape[0]):
        fillers = []
        for score, token_id in zip(top.values[m].tolist(), top.indices[m].tolist()):
            word = tokenizer.decode([token_id]).strip()
            fillers.append(
                {
                    "token": word,
                    "token_id": int(token_id),
                    "score": float(score),
                    "sequence": _fill_nth(text, spelling, m, word),
                }
            )
        results.append(fillers)
    return results


def _fill_nth(text: str, spelling: str, n: int, word: str) -> str:
    pieces = text.split(spelling)
    return spelling.join(pieces[: n + 1]) + word + spelling.join(pieces[n + 1 :])

"""Scaling laws as named presets: predicted loss for (N, D) and compute-optimal N, D for a budget.

Presets:
- `chinchilla`: Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models", Approach 3
  (eq. 10): L(N, D) = E + A / N^α + B / D^β with E 1.69, A 406.4, B 410.7, α 0.34, β 0.28.
  With C = 6ND the optimum has a closed form: N_opt = G (C/6)^(β/(α+β)),
  D_opt = G^-1 (C/6)^(α/(α+β)), G = (αA / (βB))^(1/(α+β)).
- `kaplan`: Kaplan et al. 2020, "Scaling Laws for Neural Language Models": L(N, D) =
  [(N_c/N)^(α_N/α_D) + D_c/D]^α_D (eq. 1.5, α_N 0.076, α_D 0.095, N_c 8.8e13, D_c 5.4e13), and
  the compute-efficient size N_opt = 1.3e9 · (C / PF-day)^0.73 (Figure 14), D = C / 6N.
  N counts non-embedding parameters; losses are in nats per GPT-2 token on WebText2, so they are not
  comparable with Chinchilla's (MassiveText, SentencePiece).
Beside either, the ~20 tokens-per-parameter rule of thumb read off Chinchilla: N = sqrt(C/120).
`fit` estimates E, A, B, α, β of the Chinchilla form from your own (N, D, loss) points (least
squares on log-loss; a grid over α, β with E, A, B solved linearly at each point, numpy only).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from fmforge.errors import UserError

PF_DAY = 1e15 * 86400
TOKENS_PER_PARAM = 20.0  # Chinchilla's rule of thumb


@dataclass(frozen=True)
class ChinchillaLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta."""

    E: float = 1.69
    A: float = 406.4
    B: float = 410.7
    alpha: float = 0.34
    beta: float = 0.28
    name: str = "chinchilla"
    source: str = "Hoffmann et al. 2022, Approach 3 (eq. 10)"

    def loss(self, n: float, d: float) -> float:
        """Return the predicted loss (nats/token) of N parameters trained on D tokens."""
        return self.E + self.A / n**self.alpha + self.B / d**self.beta

    def optimal(self, flops: float) -> tuple[float, float]:
        """Return the loss-minimising (N, D) under C = 6ND (closed form)."""
        a, b = self.alpha, self.beta
        g = (a * self.A / (b * self.B)) ** (1 / (a + b))
        n = g * (flops / 6) ** (b / (a + b))
        d = (flops / 6) ** (a / (a + b)) / g
        return n, d

    def constants(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if k not in ("name", "source")}


@dataclass(frozen=True)
class KaplanLaw:
    """L(N, D) = [(N_c/N)^(α_N/α_D) + D_c/D]^α_D; N_opt = n_opt_coef · (C/PF-day)^n_opt_exp."""

    alpha_N: float = 0.076
    alpha_D: float = 0.095
    N_c: float = 8.8e13
    D_c: float = 5.4e13
    n_opt_coef: float = 1.3e9
    n_opt_exp: float = 0.73
    name: str = "kaplan"
    source: str = "Kaplan et al. 2020, eq. 1.5 and Figure 14 (N_opt in non-embedding params)"

    def loss(self, n: float, d: float) -> float:
        """Return the predicted loss (nats/token, WebText2): N non-embedding params, D tokens."""
        return ((self.N_c / n) ** (self.alpha_N / self.alpha_D) + self.D_c / d) ** self.alpha_D

    def optimal(self, flops: float) -> tuple[float, float]:
        """Return Kaplan's compute-efficient N for `flops` and D = C / 6N."""
        n = self.n_opt_coef * (flops / PF_DAY) ** self.n_opt_exp
        return n, flops / (6 * n)

    def constants(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if k not in ("name", "source")}


PRESETS: dict[str, ChinchillaLaw | KaplanLaw] = {
    "chinchilla": ChinchillaLaw(),
    "kaplan": KaplanLaw(),
}


def get_law(name: str) -> ChinchillaLaw | KaplanLaw:
    """Return the scaling-law preset called `name`."""
    if name not in PRESETS:
        import difflib

        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UserError(f"scaling preset {name!r} is unknown (choose from {sorted(PRESETS)}){hint}")
    return PRESETS[name]


def _positive(name: str, value: float | None) -> None:
    if value is not None and not (value > 0 and math.isfinite(value)):
        raise UserError(f"{name} must be a positive number, got {value}")


def plan(
    flops: float | None = None,
    params: float | None = None,
    tokens: float | None = None,
    preset: str = "chinchilla",
) -> dict[str, Any]:
    """Return a scaling plan: compute-optimal N, D and loss for `flops`, or the loss of (N, D).

    Give `flops` alone, or `params` and `tokens` (then C = 6ND is reported too).
    """
    for name, value in (("--flops", flops), ("--params", params), ("--tokens", tokens)):
        _positive(name, value)
    law = get_law(preset)
    result: dict[str, Any] = {
        "preset": law.name,
        "source": law.source,
        "constants": law.constants(),
    }
    if flops is not None:
        if params is not None or tokens is not None:
            raise UserError("give --flops (plan a budget) or --params with --tokens, not both")
        n, d = law.optimal(flops)
        rule_n = math.sqrt(flops / (6 * TOKENS_PER_PARAM))
        result.update(
            flops=flops,
            params=n,
            tokens=d,
            tokens_per_param=d / n,
            loss=law.loss(n, d),
            rule_of_thumb={
                "params": rule_n,
                "tokens": TOKENS_PER_PARAM * rule_n,
                "loss": law.loss(rule_n, TOKENS_PER_PARAM * rule_n),
                "rule": "D = 20 N with C = 6ND, so N = sqrt(C / 120)",
            },
        )
    elif params is not None and tokens is not None:
        result.update(
            flops=6 * params * tokens,
            params=params,
            tokens=tokens,
            tokens_per_param=tokens / params,
            loss=law.loss(params, tokens),
        )
    else:
        raise UserError("give --flops, or both --params and --tokens")
    return result


def format_plan(result: dict[str, Any]) -> str:
    """Return the human-readable report of `plan`."""
    consts = ", ".join(f"{k} {v:g}" for k, v in result["constants"].items())
    lines = [
        f"preset {result['preset']}: {result['source']}",
        f"  constants: {consts}",
        f"compute     {result['flops']:.3g} FLOPs "
        f"({result['flops'] / PF_DAY:,.3g} PF-days, C = 6ND)",
        f"params      {result['params']:.3g}",
        f"tokens      {result['tokens']:.3g} ({result['tokens_per_param']:.1f} tokens per param)",
        f"loss        {result['loss']:.3f} nats/token (predicted, on the preset's own data)",
    ]
    rule = result.get("rule_of_thumb")
    if rule:
        lines.append(
            f"beside it, the ~20 tokens/param rule: {rule['params']:.3g} params, "
            f"{rule['tokens']:.3g} tokens, predicted loss {rule['loss']:.3f}"
        )
    return "\n".join(lines)


def fit(params: list[float], tokens: list[float], losses: list[float]) -> dict[str, Any]:
    """Return Chinchilla-form constants L = E + A/N^α + B/D^β fitted to your (N, D, loss) points.

    Variable projection, in plain numpy: for each (α, β) on a grid the best non-negative E, A, B are
    a linear least-squares solve; the grid is searched coarse (0.02) then fine (0.001) around the
    best point. Squared error is on log L, as Hoffmann et al. 2022 fit log-loss. Needs 5+ points.
    """
    import numpy as np

    if not (len(params) == len(tokens) == len(losses)):
        raise UserError("params, tokens and losses must have the same length")
    if len(params) < 5:
        raise UserError(f"a fit of 5 constants needs at least 5 points, got {len(params)}")
    for name, values in (("params", params), ("tokens", tokens), ("loss", losses)):
        for v in values:
            _positive(name, v)
    n, d, loss = (np.asarray(x, dtype=np.float64) for x in (params, tokens, losses))

    def solve(alpha: float, beta: float) -> tuple[float, np.ndarray]:
        x = np.stack([np.ones_like(n), n**-alpha, d**-beta], axis=1)  # (P, 3): E, A, B
        coef, *_ = np.linalg.lstsq(x, loss, rcond=None)
        coef = np.maximum(coef, 1e-12)  # E, A, B must be positive
        pred = x @ coef
        return float(np.sum((np.log(pred) - np.log(loss)) ** 2)), coef

    def search(alphas: np.ndarray, betas: np.ndarray) -> tuple[float, float, float, np.ndarray]:
        best = (math.inf, 0.0, 0.0, np.zeros(3))
        for alpha in alphas:
            for beta in betas:
                err, coef = solve(float(alpha), float(beta))
                if err < best[0]:
                    best = (err, float(alpha), float(beta), coef)
        return best

    _, a0, b0, _ = search(np.arange(0.02, 1.0, 0.02), np.arange(0.02, 1.0, 0.02))
    err, alpha, beta, coef = search(
        np.arange(max(a0 - 0.02, 0.001), a0 + 0.02, 0.001),
        np.arange(max(b0 - 0.02, 0.001), b0 + 0.02, 0.001),
    )
    law = ChinchillaLaw(
        E=float(coef[0]),
        A=float(coef[1]),
        B=float(coef[2]),
        alpha=float(alpha),
        beta=float(beta),
        name="fit",
        source=f"fitted to {len(params)} points (least squares on log L)",
    )
    residual = [law.loss(p, t) - y for p, t, y in zip(params, tokens, losses)]
    return {
        "preset": law.name,
        "source": law.source,
        "constants": law.constants(),
        "log_loss_sse": err,
        "max_abs_residual": max(abs(r) for r in residual),
        "law": law,
    }


def read_points(path: str) -> tuple[list[float], list[float], list[float]]:
    """Return (params, tokens, losses) from a CSV with a header, JSON lines, or a sweep's JSON.

    Rows need numeric `params`, `tokens` and `loss` (or `val_loss`); a JSON object with a `points`
    list (`fmforge experiment scaling`'s results.json) is read the same way.
    """
    import csv
    import json
    from pathlib import Path

    file = Path(path)
    if not file.is_file():
        raise UserError(f"{path}: no such file")
    text = file.read_text()
    try:
        stripped = text.lstrip()
        if stripped.startswith("{") and '"points"' in text:
            try:
                rows = json.loads(text)["points"]
            except json.JSONDecodeError:
                rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        elif stripped.startswith("{"):
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = list(csv.DictReader(text.splitlines()))
        return (
            [float(r["params"]) for r in rows],
            [float(r["tokens"]) for r in rows],
            [float(r["loss"] if "loss" in r else r["val_loss"]) for r in rows],
        )
    except (KeyError, ValueError, TypeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: each row needs numeric params, tokens and loss ({e})") from None

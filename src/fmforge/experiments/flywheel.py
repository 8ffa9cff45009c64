"""Experiment: the flywheel turns feedback into models that users prefer, and its gate refuses a
broken one.

Claim (issue #15): simulated users with a hidden preference, talking to the real server over HTTP
and reacting through `/v1/feedback`, make each flywheel cycle's version win more often against v0
on held-out prompts (judged by the hidden rule), >= 60% by the third cycle with a 95% interval
above 50%; a candidate trained with a learning rate x100 is refused by the gate, and the
incumbent keeps serving.

Setup:
1. `fmforge serve BASE --db DB --api-key-file KEY --poll-registry 1` in a subprocess: v0 = BASE.
2. The hidden rule: a good answer starts with the word `RULE_WORD` ("Indeed"). The base model
   almost never does that by itself.
3. Each round, simulated users send `prompts_per_round` chat requests (n=2, temperature 1) over
   HTTP and react to the two answers: exactly one follows the rule → a pairwise choice for it;
   both do → thumbs up on each; neither does → an edit of the first (the rule's word put in
   front) and a thumbs down on the second.
4. `fmforge flywheel cycle` (in process, the same function the command runs) curates the
   window, trains a candidate (SFT then DPO, LoRA), evaluates, gates and registers it; a promoted
   version reaches the running server through registry polling, and the experiment waits until
   the server answers with it (`X-Model-Version`) before the next round.
5. After `cycles` rounds, one more round and a cycle with `lr_scale` = 100: the gate must refuse it.
6. Win rate against v0 on `heldout_prompts` prompts never sent to the server: greedy answers of
   each version and of v0; a win when only the version's answer follows the rule, a tie (half)
   when both or neither do. The 95% interval is Wilson's, ties counted as half a win.

Writes `results.json` (`cycles`: version, promoted, win_rate_vs_v0, ci_low, ci_high per cycle;
`broken_candidate`: promoted, gate metrics), `report.md`, `win_rate.png`, the server log and each
cycle's dir.
"""

from __future__ import annotations

import random
import secrets
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fmforge.artifacts import check_output_dir, write_json_atomic
from fmforge.errors import UserError
from fmforge.experiments.stats import wilson_interval

RULE_WORD = "Indeed"
TOPICS = (
    "volcanoes", "rainbows", "tides", "glaciers", "honey bees", "the moon", "deserts", "reefs",
    "thunderstorms", "comets", "penguins", "bread", "bicycles", "libraries", "maps", "clocks",
    "gardens", "rivers", "mountains", "owls", "tea", "chess", "music", "bridges", "trains",
    "lighthouses", "forests", "snow", "the ocean", "stars", "cats", "dogs", "whales", "salt",
    "copper", "paper", "windmills", "kites", "candles", "umbrellas", "castles", "islands",
    "earthquakes", "fog", "autumn", "spring", "butterflies", "frogs", "apples", "rice", "coffee",
    "sailing", "painting", "poetry", "bees", "wolves", "caves", "lakes", "clouds", "wind",
)  # fmt: skip
TEMPLATES = (
    "What are {t}?",
    "Tell me one fact about {t}.",
    "Describe {t} in one sentence.",
    "Why do people like {t}?",
)


def follows_rule(text: str) -> bool:
    """Return whether an answer follows the hidden rule (it starts with RULE_WORD)."""
    return text.lstrip().startswith(RULE_WORD)


def with_rule(text: str) -> str:
    """Return the answer a user edits in: RULE_WORD, then the original answer."""
    text = "".join(ch for ch in text if ch.isprintable() or ch in "\n\t").strip()  # no NULs
    return f"{RULE_WORD}, {text[:1].lower()}{text[1:]}" if text else f"{RULE_WORD}."


@dataclass
class FlywheelExperiment:
    """Sizes of the experiment (the defaults take ~6 minutes on 2 CPU cores with SmolLM2-135M)."""

    base: str = "smollm2-135m-instruct"  # v0: a model dir or a built-in name
    cycles: int = 3  # flywheel cycles (each after one round of traffic)
    prompts_per_round: int = 24  # chat requests per round (each n=2)
    heldout_prompts: int = 40  # prompts never sent to the server, for the win rate
    max_tokens: int = 12  # tokens per served answer
    judge_tokens: int = 4  # tokens generated per held-out answer (the rule reads the first word)
    sft_steps: int = 3  # per cycle (10 learns the rule in one cycle: docs/flywheel.md)
    dpo_steps: int = 3  # per cycle
    batch_size: int = 4  # SFT rows / DPO pairs per step
    seq_len: int = 96  # tokens per SFT row / DPO sequence
    guard_tokens: int = 1024  # guard text scored per model
    broken_lr_scale: float = 100.0  # the deliberately broken candidate's learning-rate factor
    concurrency: int = 4  # simultaneous users
    seed: int = 0


def _say(message: str) -> None:
    print(f"[flywheel] {message}", file=sys.stderr, flush=True)


def _prompts(seed: int) -> list[str]:
    prompts = [t.format(t=topic) for topic in TOPICS for t in TEMPLATES]
    random.Random(seed).shuffle(prompts)
    return prompts


class _Server:
    """`fmforge serve BASE --db DB` on a free port, with an API key; stopped by `close`."""

    def __init__(self, base: str, db: str, out: Path):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.key = secrets.token_hex(16)
        key_file = out / "api-key.txt"
        key_file.write_text(self.key + "\n", encoding="utf-8")
        key_file.chmod(0o600)
        self.log = open(out / "server.log", "w", encoding="utf-8")  # noqa: SIM115
        args = [sys.executable, "-m", "fmforge.cli", "serve", base, "--db", db,
                "--port", str(self.port), "--api-key-file", str(key_file),
                "--poll-registry", "1", "--max-concurrency", "8",
                "--log-level", "warning"]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        self.model = ""
        import httpx

        self.client = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=600
        )

    def wait_ready(self, timeout: float = 300) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise UserError(f"the server exited ({self.proc.returncode}); see server.log")
            try:
                if self.client.get("/ready").status_code == 200:
                    self.model = self.client.get("/v1/models").json()["data"][0]["id"]
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise UserError("the server did not become ready; see server.log")

    def chat(self, prompt: str, max_tokens: int, seed: int) -> tuple[str, str, list[str]]:
        """Return (generation id, serving version, the two answers)."""
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "n": 2,
            "temperature": 1.0,
            "max_tokens": max_tokens,
            "seed": seed,
        }
        response = self.client.post("/v1/chat/completions", json=body)
        response.raise_for_status()
        out = response.json()
        texts = [c["message"]["content"] for c in out["choices"]]
        return out["id"], response.headers.get("X-Model-Version", ""), texts

    def feedback(self, gen_id: str, kind: str, value: Any, choice: int = 0) -> None:
        body = {"generation_id": gen_id, "kind": kind, "value": value, "choice_index": choice,
                "idempotency_key": f"{gen_id}-{kind}-{choice}"}  # fmt: skip
        response = self.client.post("/v1/feedback", json=body)
        if response.status_code != 200:
            raise UserError(f"/v1/feedback answered {response.status_code}: {response.text[:300]}")

    def version(self) -> str:
        response = self.client.post(
            "/v1/chat/completions",
            json={"model": self.model, "messages": [{"role": "user", "content": "hi"}],
                  "max_tokens": 1, "store": False},  # a probe: not logged
        )  # fmt: skip
        response.raise_for_status()
        return response.headers.get("X-Model-Version", "")

    def wait_version(self, version: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while self.version() != version:
            if time.monotonic() > deadline:
                raise UserError(f"the server did not switch to {version}; see server.log")
            time.sleep(0.5)

    def close(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def _round(server: _Server, prompts: list[str], exp: FlywheelExperiment, seed: int) -> dict:
    """One round of simulated users: chat, then react; return what was served and given."""

    def user(item: tuple[int, str]) -> tuple[str, list[bool], dict[str, int]]:
        i, prompt = item
        gen_id, version, texts = server.chat(prompt, exp.max_tokens, seed * 10_000 + i)
        ok = [follows_rule(t) for t in texts]
        given: dict[str, int] = {}
        if ok.count(True) == 1:
            chosen = ok.index(True)
            server.feedback(gen_id, "pairwise", {"chosen": chosen, "rejected": 1 - chosen})
            given["pairwise"] = 1
        elif all(ok):
            server.feedback(gen_id, "thumbs", "up", 0)
            server.feedback(gen_id, "thumbs", "up", 1)
            given["thumbs"] = 2
        else:
            server.feedback(gen_id, "edit", with_rule(texts[0]), 0)
            server.feedback(gen_id, "thumbs", "down", 1)
            given.update(edit=1, thumbs=1)
        return version, ok, given

    with ThreadPoolExecutor(exp.concurrency) as pool:
        results = list(pool.map(user, enumerate(prompts)))
    served = [ok for _, oks, _ in results for ok in oks]
    counts: dict[str, int] = {}
    for _, _, given in results:
        for kind, n in given.items():
            counts[kind] = counts.get(kind, 0) + n
    return {
        "versions": sorted({v for v, _, _ in results}),
        "requests": len(prompts),
        "served_follow_rule": sum(served) / len(served),
        "feedback": counts,
    }


def _answers(version: Any, prompts: list[str], tokens: int) -> list[str]:
    """Return greedy answers of a registry version to chat prompts (batched on the engine)."""
    from fmforge.flywheel.registry import load_version
    from fmforge.generate.engine import chat_prompt, generate_tokens

    bundle = load_version(version)
    rendered = [chat_prompt(bundle.tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    stop = rendered[0][1]
    out = generate_tokens(bundle.model, [ids for ids, _ in rendered], tokens, stop_token_ids=stop)
    return [bundle.tokenizer.decode(g.tokens) for g in out]


def win_rate(version_answers: list[str], base_answers: list[str]) -> dict:
    """Return the win rate against v0 (ties half) and its 95% Wilson interval over prompts."""
    scores = [
        0.5 + 0.5 * (follows_rule(a) - follows_rule(b))
        for a, b in zip(version_answers, base_answers)
    ]
    low, high = wilson_interval(sum(scores), len(scores))
    follows = sum(follows_rule(a) for a in version_answers)
    return {
        "win_rate_vs_v0": round(sum(scores) / max(1, len(scores)), 4),
        "ci_low": round(low, 4),
        "ci_high": round(high, 4),
        "follows_rule": round(follows / max(1, len(version_answers)), 4),
    }


def run_flywheel_experiment(
    out: str | Path, exp: FlywheelExperiment | None = None, overwrite: bool = False
) -> dict[str, Any]:
    """Run the experiment into `out`; return the results (also out/results.json)."""
    from fmforge.flywheel.cycle import CycleConfig, run_cycle
    from fmforge.flywheel.datasets import NothingToLearn
    from fmforge.flywheel.registry import Registry

    exp = exp or FlywheelExperiment()
    out = check_output_dir(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    db = str((out / "flywheel.db").resolve())
    if Path(db).exists():
        Path(db).unlink()
    prompts = _prompts(exp.seed)
    heldout, pool = prompts[: exp.heldout_prompts], prompts[exp.heldout_prompts :]
    needed = (exp.cycles + 1) * exp.prompts_per_round
    if needed > len(pool):
        raise UserError(f"{needed} prompts needed, {len(pool)} available: lower the sizes")
    config = CycleConfig(
        sft_steps=exp.sft_steps,
        dpo_steps=exp.dpo_steps,
        batch_size=exp.batch_size,
        seq_len=exp.seq_len,
        metric="pair_margin",
        guard_tokens=exp.guard_tokens,
        seed=exp.seed,
    )
    server = _Server(exp.base, db, out)
    rounds, cycles = [], []
    try:
        server.wait_ready()
        _say(f"server ready at {server.url} ({time.perf_counter() - started:.0f} s)")
        for cycle in range(1, exp.cycles + 2):
            broken = cycle == exp.cycles + 1
            batch = pool[(cycle - 1) * exp.prompts_per_round : cycle * exp.prompts_per_round]
            served = _round(server, batch, exp, seed=exp.seed + cycle)
            rounds.append(served)
            _say(f"round {cycle}: {served}")
            cfg = CycleConfig(
                **{**asdict(config), "lr_scale": exp.broken_lr_scale if broken else 1.0}
            )
            try:
                result = run_cycle(db, None, out / f"cycle-{cycle}", cfg)
            except NothingToLearn as e:
                _say(f"cycle {cycle}: nothing to learn from yet ({e})")
                continue
            result["broken"] = broken
            cycles.append(result)
            _say(f"cycle {cycle}{' (broken)' if broken else ''}: {result}")
            if result["decision"] == "promote":
                server.wait_version(result["version"])
        serving_at_end = server.version()
    finally:
        server.close()
    registry = Registry(db)
    versions = {v.id: v for v in registry.list()}
    _say(f"judging {len(versions)} versions on {len(heldout)} held-out prompts")
    base_answers = _answers(versions["v0"], heldout, exp.judge_tokens)
    rows = []
    for result in cycles:
        version = versions[result["version"]]
        judged = win_rate(_answers(version, heldout, exp.judge_tokens), base_answers)
        rows.append(
            {
                "version": version.id,
                "promoted": result["decision"] == "promote",
                **judged,
                "gate": version.gate,
                "broken": result["broken"],
            }
        )
    normal = [r for r in rows if not r["broken"]]
    broken_rows = [r for r in rows if r["broken"]]
    results = {
        "claim": "win rate vs v0 rises with the cycles, >= 0.6 by the third with ci_low > 0.5; "
        "the broken candidate is refused",
        "experiment": asdict(exp),
        "cycle_config": asdict(config),
        "v0_follows_rule": round(sum(map(follows_rule, base_answers)) / len(base_answers), 4),
        "cycles": [
            {
                k: r[k]
                for k in (
                    "version",
                    "promoted",
                    "win_rate_vs_v0",
                    "ci_low",
                    "ci_high",
                    "follows_rule",
                )
            }
            for r in normal
        ],  # fmt: skip
        "broken_candidate": (
            {
                "version": broken_rows[0]["version"],
                "promoted": broken_rows[0]["promoted"],
                "metrics": broken_rows[0]["gate"].get("metrics", {}),
                "reason": broken_rows[0]["gate"].get("reason", ""),
                "serving_after": serving_at_end,
            }
            if broken_rows
            else None
        ),
        "rounds": rounds,
        "serving_history": registry.history(),
        "seconds": round(time.perf_counter() - started, 1),
    }
    registry.close()
    rates = [r["win_rate_vs_v0"] for r in results["cycles"]]
    last = results["cycles"][-1] if results["cycles"] else None
    results["claim_holds"] = bool(
        last is not None
        and len(rates) == exp.cycles
        and all(b >= a for a, b in zip(rates, rates[1:]))
        and last["win_rate_vs_v0"] >= 0.6
        and last["ci_low"] > 0.5
        and results["broken_candidate"] is not None
        and not results["broken_candidate"]["promoted"]
    )
    write_json_atomic(out / "results.json", results)
    _plot(results, out / "win_rate.png")
    _report(results, out / "report.md")
    return results


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["cycles"]
    x = list(range(1, len(rows) + 1))
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    rates = [r["win_rate_vs_v0"] for r in rows]
    low = [r["win_rate_vs_v0"] - r["ci_low"] for r in rows]
    high = [r["ci_high"] - r["win_rate_vs_v0"] for r in rows]
    left.errorbar(x, rates, yerr=[low, high], fmt="o-", capsize=4)
    left.axhline(0.5, color="grey", ls=":")
    left.axhline(0.6, color="green", ls="--", lw=0.8)
    left.set_xticks(x, [f"{r['version']}{'' if r['promoted'] else ' (rej.)'}" for r in rows])
    left.set_ylim(0, 1.05)
    left.set_title("win rate vs v0 (held-out, 95% CI)")
    served = [r["served_follow_rule"] for r in results["rounds"]]
    right.plot(range(1, len(served) + 1), served, "s-")
    right.set_xlabel("round of traffic")
    right.set_ylim(0, 1.05)
    right.set_title("served answers following the rule")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _report(results: dict, path: Path) -> None:
    exp = results["experiment"]
    lines = [
        "# Experiment: the data flywheel",
        "",
        f'Base (v0): `{exp["base"]}`. Hidden rule: an answer starts with "{RULE_WORD}". '
        f"{exp['prompts_per_round']} chat requests (n=2) per round over HTTP, "
        f"{exp['heldout_prompts']} held-out prompts, {exp['sft_steps']} SFT + "
        f"{exp['dpo_steps']} DPO LoRA steps per cycle; {results['seconds']:.0f} s in all.",
        "",
        "![win rate](win_rate.png)",
        "",
        f"v0 follows the rule on {results['v0_follows_rule']:.0%} of held-out prompts.",
        "",
        "| cycle | version | promoted | win rate vs v0 | 95% CI | follows rule |",
        "|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(results["cycles"], 1):
        lines.append(
            f"| {i} | {r['version']} | {r['promoted']} | {r['win_rate_vs_v0']:.3f} | "
            f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}] | {r['follows_rule']:.0%} |"
        )
    broken = results["broken_candidate"]
    if broken:
        lines += [
            "",
            f"Broken candidate (lr x{exp['broken_lr_scale']:g}): {broken['version']}, promoted "
            f"{broken['promoted']}; gate: {broken['reason']}. Serving afterwards: "
            f"{broken['serving_after']}.",
        ]
    lines += ["", "Rounds of traffic:", ""]
    for i, r in enumerate(results["rounds"], 1):
        lines.append(
            f"- round {i}: served by {', '.join(r['versions'])}; "
            f"{r['served_follow_rule']:.0%} of answers follow the rule; feedback {r['feedback']}"
        )
    lines += ["", f"Claim holds: **{results['claim_holds']}**.", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def results_summary(results: dict) -> dict:
    """Return the headline figures of a results dict."""
    return {
        "claim_holds": results["claim_holds"],
        "cycles": results["cycles"],
        "broken_candidate_promoted": (results["broken_candidate"] or {}).get("promoted"),
        "seconds": results["seconds"],
    }

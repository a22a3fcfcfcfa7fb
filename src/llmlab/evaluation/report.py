"""reports/report.md: the measurements of the evaluate stage as one document, with its figures.

Every number printed here comes from the metrics and details the stage measured in this run; nothing is
written in advance. Each section names the claim it tests, the sample size, and for a rate its 95 %
interval. Where the interval does not separate the two things a claim compares, the section says that
this model does not show it, with the numbers, instead of asserting it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llmlab.data.tokenizer import flat_metrics
from llmlab.evaluation.attention_cost import plot_scaling
from llmlab.evaluation.attention_maps import plot_heads
from llmlab.evaluation.measurements import rate_of
from llmlab.io import atomic_path, write_text
from llmlab.stats import rate_diff_ci

MODEL_NAMES = {"base": "base (pretrained)", "sft": "SFT", "ppo": "PPO (RLHF)", "dpo": "DPO"}


# ------------------------------------------------------------------------------------------ numbers


def pct(r: Mapping[str, float]) -> str:
    """A rate as text: `pct({"rate": 0.5, "ci_low": 0.3, "ci_high": 0.7, "n": 20})` -> '50.0 % [30.0–70.0]'."""
    if not r.get("n"):
        return "n/a (no sample)"
    return f"{100 * r['rate']:.1f} % [{100 * r['ci_low']:.1f}–{100 * r['ci_high']:.1f}]"


def by_people(models: Mapping[str, Mapping], key: str = "hallucination") -> str:
    """The bullet of `key`'s rate with the interval that counts each person as one draw
    (`measurements.rate_by_cluster`), one model after another; "" when the metrics lack it."""
    rates = {name: m[key] for name, m in models.items() if m[key].get("ci_low_people") is not None}
    if not rates:
        return ""
    people = next(iter(rates.values()))["people"]
    each = ", ".join(
        f"{MODEL_NAMES[n].split(' (')[0]} {100 * r['rate']:.1f} % [{100 * r['ci_low_people']:.1f}–{100 * r['ci_high_people']:.1f}]"
        for n, r in rates.items()
    )
    return (
        f"\n- Counted with each of the {people} unknown people as one draw (a model's answers about one person "
        f"can go alike), the invented answers' intervals are {each}."
    )


def avg(r: Mapping[str, float], digits: int = 2) -> str:
    """A mean as text: '0.87 ± 0.13'."""
    return f"{r['mean']:+.{digits}f} ± {r['ci95']:.{digits}f}" if r.get("n") else "n/a"


def difference(higher: Mapping[str, float], lower: Mapping[str, float]) -> tuple[bool, str]:
    """Is `higher` really above `lower`? (shown, "difference +6.8 points [+0.9, +12.6]"): shown when the 95 %
    interval of the difference of the two rates (Newcombe) lies wholly above 0."""

    if not higher.get("n") or not lower.get("n"):
        return False, "no sample"
    k = lambda r: round(r["rate"] * r["n"])  # noqa: E731
    d, lo, hi = rate_diff_ci(k(higher), higher["n"], k(lower), lower["n"])
    return lo > 0, f"difference {100 * d:+.1f} points, 95 % interval [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def compare(
    claim: str,
    higher: Mapping[str, float],
    lower: Mapping[str, float],
    names: tuple[str, str],
    by_person: Mapping[str, float] | None = None,
) -> str:
    """The verdict line of a claim that `higher` exceeds `lower`, with both rates and their difference.
    `by_person`, when given (`measurements.rate_diff_by_cluster` of higher − lower on the same questions),
    decides instead of the two rates' Newcombe interval: its interval counts each person as one draw."""
    shown, diff = difference(higher, lower)
    opposite = difference(lower, higher)[0]
    if by_person and by_person.get("ci_low") is not None:
        lo, hi = by_person["ci_low"], by_person["ci_high"]
        shown, opposite = lo > 0, hi < 0
        diff = (
            f"difference {100 * by_person['diff']:+.1f} points, 95 % interval [{100 * lo:+.1f}, {100 * hi:+.1f}] "
            f"with each of {by_person['people']} people one draw"
        )
    numbers = f"{names[0]} {pct(higher)} vs {names[1]} {pct(lower)}; {diff}"
    if not shown and opposite:  # the interval lies wholly on the other side of 0
        return f"**Not shown by this model: the opposite was measured:** {claim} ({numbers})."
    return verdict(shown, claim, numbers)


def halves(claim: str, d: Mapping[str, float] | None, names: tuple[str, str]) -> str:
    """The verdict line of a claim that model names[0] at least halves names[1]'s rate, from
    `rate_diff_by_cluster(a, b, people, scale_b=0.5)`: shown when its interval lies below 0; "" without it."""
    if not d or d.get("ci_high") is None:
        return ""
    numbers = (
        f"{names[0]}'s rate minus half of {names[1]}'s {100 * d['diff']:+.1f} points, 95 % interval "
        f"[{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}] with each of {d['people']} people one draw"
    )
    if d["ci_low"] > 0:
        return f"**Not shown by this model: the opposite was measured:** {claim} ({numbers})."
    return verdict(d["ci_high"] < 0, claim, numbers)


def negated(d: Mapping[str, float] | None) -> dict | None:
    """A difference a − b as b − a (`rate_diff_by_cluster`'s fields); None stays None."""
    if not d or d.get("diff") is None:
        return None
    return {**d, "diff": -d["diff"], "ci_low": -d["ci_high"], "ci_high": -d["ci_low"]}


def pooled(rates: list[Mapping[str, float]]) -> dict[str, float]:
    """Several rates' samples taken together, with the Wilson interval of the pooled rate."""

    return rate_of(sum(round(r["rate"] * r["n"]) for r in rates if r["n"]), sum(r["n"] for r in rates))


def verdict(shown: bool, what: str, numbers: str) -> str:
    if shown:
        return f"**Shown:** {what} ({numbers})."
    return (
        f"**Not shown convincingly by this model:** {what} — the difference is within the noise ({numbers})."
    )


def flat(d: Mapping[str, Any]) -> dict[str, float]:
    """Nested metrics -> flat MLflow names: {"suite": {"sft": {"accuracy": {"rate": 0.9}}}} -> {"suite/sft/accuracy/rate": 0.9}.
    MLflow refuses "=" in a name ("T=0.5" becomes "T_0.5"); nulls (no sample) are left out."""

    return {k.replace("=", "_"): v for k, v in flat_metrics(d).items() if math.isfinite(v)}


def pretraining_figures(loss: Mapping[str, list[dict]]) -> dict[str, float]:
    """The last train and validation loss of the pretrain stage's curves, and its number of steps."""
    return {
        "final_train_loss": loss["train"][-1]["loss"],
        "final_val_loss": loss["val"][-1]["loss"],
        "steps": int(loss["train"][-1]["step"]),
    }


def write_report(
    path: str | Path, m: dict, details: dict, loss, calibration, iterations, weights, token_text
) -> int:
    """reports/report.md at `path` and its PNG figures in figures/ beside it, both written whole or not at
    all; returns the number of figures."""
    with atomic_path(Path(path).parent / "figures", is_dir=True) as folder:
        plots = figures(folder, m, details, loss, calibration, iterations, weights, token_text)
    write_text(path, markdown(m, details, {k: f"figures/{v}" for k, v in plots.items()}, iterations))
    return len(plots)


def token_figures(report: Mapping[str, Any]) -> dict[str, Any]:
    """The tokenizer stage's measurements the report cites (see tokenizer.tokenizer_report)."""
    keys = (
        "chars_per_token",
        "words_per_token",
        "chars_per_1000_tokens",
        "words_per_1000_tokens",
        "tokens_per_number",
        "tokens_per_number_spaced",
        "tokens_per_word",
        "vocab_size",
        "validation",
    )
    out = {k: report[k] for k in keys if k in report}
    out["example_tokens"] = {e["word"]: e["n_tokens"] for e in report.get("examples", [])}
    return out


def scaling_rows(result: Mapping[str, Any]) -> list[dict[str, float]]:
    """attention_scaling's result as one row per sequence length (for `dvc plots` and the report's table)."""
    rows = []
    for i, T in enumerate(result["lengths"]):
        rows.append(
            {
                "seq_len": T,
                "attention_ms": 1e3 * result["attention_explicit"]["time_s"][i],
                "sdpa_ms": 1e3 * result["attention_sdpa"]["time_s"][i],
                "model_ms": 1e3 * result["model"]["time_s"][i],
                "attention_mem_mb": result["attention_explicit"]["memory_bytes"][i] / 2**20,
                "sdpa_mem_mb": result["attention_sdpa"]["memory_bytes"][i] / 2**20,
                "model_mem_mb": result["model"]["memory_bytes"][i] / 2**20,
            }
        )
    return rows


# ------------------------------------------------------------------------------------------ figures


def figures(
    folder: Path,
    m: Mapping,
    details: Mapping,
    loss: Mapping,
    calibration: list,
    iterations: list,
    weights,
    tokens: list[str],
) -> dict[str, str]:
    """Draw every figure into `folder`; return {name: file name}."""
    import matplotlib  # here, not at the top: the Agg backend must be chosen before pyplot is imported

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, str] = {}

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(folder / f"{name}.png", dpi=110)
        plt.close(fig)
        out[name] = f"{name}.png"

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in loss["train"]], [r["loss"] for r in loss["train"]], label="train", lw=0.8)
    ax.plot(
        [r["step"] for r in loss["val"]],
        [r["loss"] for r in loss["val"]],
        "o-",
        label="validation (held-out text)",
    )
    ax.set(
        xlabel="optimiser step",
        ylabel="next-token cross-entropy (nats)",
        yscale="log",
        title="Pretraining loss",
    )
    ax.legend()
    save(fig, "pretraining_loss")

    if "suite" in m:
        names = [n for n in MODEL_NAMES if n in m["suite"]]
        rows = [
            ("format adherence", lambda s: s["format_adherence"]),
            ("accuracy", lambda s: s["accuracy"]),
            ("hallucination\n(unknown people)", lambda s: s["hallucination"]),
            ("refusal\n(harmful requests)", lambda s: s["refusal_harmful"]),
            ("politeness", lambda s: s["politeness"]),
        ]
        fig, ax = plt.subplots(figsize=(8, 3.8))
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            rs = [get(m["suite"][name]) for _, get in rows]
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(rows))]
            ax.bar(
                xs,
                [r["rate"] if r["n"] else 0.0 for r in rs],
                width,
                yerr=error_bars(rs),
                capsize=2,
                label=MODEL_NAMES[name],
            )
        ax.set_xticks(range(len(rows)), [label for label, _ in rows], fontsize=8)
        ax.set(
            ylim=(0, 1.05),
            ylabel="rate (95 % CI)",
            title=f"The same {m['suite']['n_prompts']} held-out prompts",
        )
        ax.legend(fontsize=8)
        save(fig, "models")

    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect calibration")
    ax.plot(
        [r["predicted"] for r in calibration],
        [r["observed"] for r in calibration],
        "o-",
        label="reward model",
    )
    ax.set(
        xlabel="predicted P(chosen preferred)",
        ylabel="observed share preferred",
        title="Reward model calibration",
    )
    ax.legend(fontsize=8)
    save(fig, "reward_calibration")

    its = [r["iteration"] for r in iterations]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    axes[0].plot(its, [r["objective/scores"] for r in iterations], label="reward model score (optimised)")
    if iterations[0].get("gold/score") is not None:
        axes[0].plot(its, [r["gold/score"] for r in iterations], label="gold score (rater, never seen)")
    axes[0].plot(its, [r["objective/kl"] for r in iterations], label="KL to SFT (nats / reply)")
    axes[0].set(xlabel="PPO iteration", title="PPO, per iteration")
    axes[0].legend(fontsize=8)
    root_kl = [math.sqrt(max(r["objective/kl"], 0.0)) for r in iterations]
    axes[1].plot(root_kl, [r["objective/scores"] for r in iterations], "o", ms=3, label="reward model score")
    if iterations[0].get("gold/score") is not None:
        axes[1].plot(root_kl, [r["gold/score"] for r in iterations], "s", ms=3, label="gold score")
    axes[1].set(xlabel="√KL(policy ‖ SFT)", ylabel="score", title="Over-optimisation: proxy against gold")
    axes[1].legend(fontsize=8)
    save(fig, "ppo")

    if "temperature" in m:
        rows_t = list(m["temperature"].values())
        T = [r["temperature"] for r in rows_t]
        fig, ax = plt.subplots(figsize=(6, 3.8))
        acc = [r["accuracy"] for r in rows_t]
        ax.errorbar(
            T,
            [num(a["rate"]) for a in acc],
            yerr=error_bars(acc),
            fmt="o-",
            capsize=3,
            label="accuracy (95 % CI)",
        )
        ax.plot(T, [r["distinct_2"] for r in rows_t], "s--", label="distinct-2 (diversity)")
        ax.plot(T, [r["unique_share"] for r in rows_t], "^:", label="different samples per prompt")
        ax.set(
            xlabel="temperature", ylim=(0, 1.05), title="PPO model: temperature trades accuracy for diversity"
        )
        ax.legend(fontsize=8)
        save(fig, "temperature")

    if "chain_of_thought" in m:
        fig, ax = plt.subplots(figsize=(6, 3.8))
        for model, rows_c in m["chain_of_thought"].items():
            for fmt, style in (("step_by_step", "o-"), ("bare", "s--")):
                sel = [r for r in rows_c.values() if r["format"] == fmt]
                ax.plot(
                    [r["digits"] for r in sel],
                    [num(r["accuracy"]["rate"]) for r in sel],
                    style,
                    label=f"{MODEL_NAMES[model]}, {fmt.replace('_', ' ')}",
                )
        ax.set(
            xlabel="digits per addend",
            ylabel="accuracy",
            ylim=(0, 1.05),
            title="Addition: working written out vs bare answer",
        )
        ax.legend(fontsize=8)
        save(fig, "chain_of_thought")

    plot_scaling(details["attention_cost"], folder / "attention_cost.png")
    out["attention_cost"] = "attention_cost.png"
    heads = details["attention_maps"]["heads"]
    plot_heads(
        weights,
        tokens,
        [(h["layer"], h["head"]) for h in heads],
        folder / "attention_heads.png",
        title="Attention of the base model (row: query token; column: the token it reads)",
        captions=[f"{h['role']} head" for h in heads],
    )
    out["attention_heads"] = "attention_heads.png"
    return out


def num(x: float | None) -> float:
    """A measured number for a plot: None (no sample) becomes NaN, which matplotlib leaves out."""
    return math.nan if x is None else x


def error_bars(rates: list[Mapping[str, float]]) -> list[list[float]]:
    """matplotlib's yerr (below, above) for rates with Wilson intervals; nothing for a rate with no sample."""
    below = [max(0.0, r["rate"] - r["ci_low"]) if r["n"] else 0.0 for r in rates]
    above = [max(0.0, r["ci_high"] - r["rate"]) if r["n"] else 0.0 for r in rates]
    return [below, above]


# ------------------------------------------------------------------------------------------ markdown


def markdown(m: Mapping, details: Mapping, fig: Mapping[str, str], iterations: list[dict]) -> str:
    """The whole report."""
    parts = [HEADER]
    parts.append(_tokens(m["tokens"], details.get("example_tokens", {})))
    parts.append(_pretraining(m, details, fig))
    if "suite" in m:
        parts.append(_knowledge(m))
        parts.append(_post_training(m, fig))
    else:
        parts.append(NO_RATER)
    parts.append(_reward(m, fig))
    parts.append(_ppo(m, fig, iterations))
    if "temperature" in m:
        parts.append(_temperature(m, fig))
    if "chain_of_thought" in m:
        parts.append(_cot(m, fig))
    parts.append(_attention_cost(details, fig))
    if "context" in m:
        parts.append(_context(m, details))
    parts.append(_attention_maps(details, fig))
    if "position" in m:
        parts.append(_position(m, details))
        parts.append(_distractors(m))
    if m.get("preferences", {}).get("gold_rater"):
        parts.append(_constitution(m))
    times = ", ".join(f"{k} {v:.0f} s" for k, v in details["timings_s"].items())
    parts.append(
        f"---\nMeasured by the `evaluate` stage ({times}). Every reply behind these numbers: "
        "`reports/evaluate/details.json`.\n"
    )
    return "\n".join(parts)


HEADER = """# What this run's models show about how LLMs work

Each section tests one claim on the models this pipeline run trained: the **base** model (pretraining
only), the **SFT** model (fine-tuned on demonstrations) and the **PPO** model (RLHF against the reward
model). Rates are given as `rate [95 % Wilson interval]`, means as `mean ± 95 % half-width`; `n` is the
sample size. The held-out suite uses prompts from the evaluation pool, which no training stage saw.
"""

NO_RATER = """## 3–4. Knowledge, SFT and RLHF

Not measured: this run used a real corpus and real chat/preference data, so there is no synthetic world
and no rater to grade answers against the truth. Sections 2 (loss), 5, 6 and 9–11 still apply.
"""


def _tokens(t: Mapping, tokens_of: Mapping[str, list[str]]) -> str:
    nums = t["tokens_per_number"]
    spaced = t.get("tokens_per_number_spaced", {})
    table = "\n".join(
        f"| {k.split('_')[0]} | {v:.2f} | {spaced.get(k, float('nan')):.2f} |" for k, v in nums.items()
    )
    w = t["tokens_per_word"]
    v = t["validation"]
    examples = "\n".join(
        f"| `{word!r}` | {' '.join('`' + p.replace(' ', '·') + '`' for p in pieces)} | {len(pieces)} |"
        for word, pieces in tokens_of.items()
    )
    return f"""## 1. Models read tokens, not characters or words

The tokenizer ({t["vocab_size"]} tokens, trained with BPE on this corpus) cuts held-out text
({v["documents"]} documents, {v["characters"]:,} characters) into **{t["chars_per_token"]:.2f} characters per
token** ({t["words_per_token"]:.2f} words per token). A 1,000-token context therefore holds about
**{t["chars_per_1000_tokens"]:,.0f} characters, or {t["words_per_1000_tokens"]:,.0f} words**, of this kind of text.

Numbers are cut into digits (200 random numbers per length):

| digits | tokens, alone | tokens, mid-sentence (" 123") |
|---|---|---|
{table}

Frequent words are single tokens, rare ones are spelled out in pieces: the {w["n_common"]} most common
words of the held-out text take **{w["common"]:.2f}** tokens each, its {w["n_rare"]} least frequent (seen at most
{w.get("rare_max_count", 1)} times) take **{w["rare"]:.2f}**. The article's example words, token by token (· is a space):

| text | tokens | count |
|---|---|---|
{examples}
"""


def _pretraining(m: Mapping, details: Mapping, fig: Mapping) -> str:
    p = m["pretraining"]
    text = f"""## 2. Pretraining is next-token prediction

![pretraining loss]({fig["pretraining_loss"]})

The only objective is the cross-entropy of the next token: it fell to {p["final_train_loss"]:.3f} (train)
and {p["final_val_loss"]:.3f} (held-out text) after {p["steps"]:,} steps.
"""
    if "suite" in m:
        s = m["suite"]
        text += (
            f"""
Does a model that was only pretrained answer a question put in the chat format, and stop? **Format
adherence** (a reply that closes its turn with `<|end|>` and writes no other role's turn), on the same
{s["n_prompts"]} held-out prompts:

| model | format adherence |
|---|---|
"""
            + "\n".join(
                f"| {MODEL_NAMES[n]} | {pct(s[n]['format_adherence'])} |" for n in MODEL_NAMES if n in s
            )
            + "\n\n"
        )
        text += (
            compare(
                "pretraining alone does not teach the chat format; SFT does",
                s["sft"]["format_adherence"],
                s["base"]["format_adherence"],
                ("SFT", "base"),
            )
            + "\n"
        )
        ex = details.get("base_plain_text", [])[:3]
        if ex:
            text += "\nThe base model given a question as plain text continues it as a document:\n\n"
            text += "\n".join(f"- `{e['question']}` → `{e['completion'].strip()[:120]}`" for e in ex) + "\n"
    return text


def _knowledge(m: Mapping) -> str:
    k, s = m["knowledge"], m["suite"]
    g = {n: s[n]["fact_accuracy_by_group"] for n in ("sft", "ppo")}
    by_group = k.get("fact_recall_base_by_group", {})
    shown, diff = difference(g["sft"]["sft"], g["sft"]["heldout"])
    reading = (
        (
            "The base model stored both groups' facts alike; SFT taught the model to retrieve the facts of the "
            "people it was drilled on, and that skill did not carry over to the rest: their facts stay in the "
            "weights (statement completion finds them) but do not come out as answers."
        )
        if shown
        else ""
    )
    return f"""## 3. Knowledge lives in the weights

**Fact recall of the base model**: completing the canonical statement of a fact ("… lives in") greedily,
it gives the true value for {pct(k["fact_recall_base"])} of {k["fact_recall_base"]["n"]} facts
(people SFT will ask about: {100 * by_group.get("sft", math.nan):.1f} %; people only the corpus mentions:
{100 * by_group.get("heldout", math.nan):.1f} %). Nothing but pretraining put them there.

Asked as questions after SFT — about people SFT asked other questions about, and about people only the
corpus mentioned:

| model | fact questions, people SFT asked about | people only in the corpus |
|---|---|---|
| SFT | {pct(g["sft"]["sft"])}, n={g["sft"]["sft"]["n"]} | {pct(g["sft"]["heldout"])}, n={
        g["sft"]["heldout"]["n"]
    } |
| PPO | {pct(g["ppo"]["sft"])}, n={g["ppo"]["sft"]["n"]} | {pct(g["ppo"]["heldout"])}, n={
        g["ppo"]["heldout"]["n"]
    } |

{
        verdict(
            shown,
            "SFT answers about the people it practised on better than about people only the corpus mentioned",
            f"practised {pct(g['sft']['sft'])} vs corpus only {pct(g['sft']['heldout'])}; {diff}",
        )
    }
{reading}
{_diagnosis(m)}"""


def _diagnosis(m: Mapping) -> str:
    """Stored or extracted? For the people only the corpus mentions, three views of the same facts."""
    k, s = m["knowledge"], m["suite"]
    models = [n for n in MODEL_NAMES if f"name_probe_{n}" in k]
    if not models:
        return ""
    rows = "\n".join(
        f"| {n.upper() if n != 'base' else 'base'} | {100 * k[f'fact_recall_{n}_by_group'].get('heldout', math.nan):.1f} % "
        f"| {100 * k[f'name_probe_{n}'].get('mean', math.nan):.1f} % | {pct(s[n]['fact_accuracy_by_group']['heldout'])} |"
        for n in models
    )
    return f"""
**Stored, or extracted?** For the people only the corpus mentions: completing a fact's statement (the fact is in
the weights), a linear probe reading the fact from the model's state at the person's name alone (stored where a
question can find it; trained on the SFT people, tested on these), and answering the question (extracted):

| model | statement completion | name-only probe | question answering |
|---|---|---|---|
{rows}
"""


def _post_training(m: Mapping, fig: Mapping) -> str:
    s, k, ppl = m["suite"], m["knowledge"], m["perplexity"]
    rows = [
        ("accuracy (all kinds)", lambda x: pct(x["accuracy"])),
        ("hallucination: invents facts about unknown people", lambda x: pct(x["hallucination"])),
        ("refuses harmful requests", lambda x: pct(x["refusal_harmful"])),
        ("declines answerable fact questions", lambda x: pct(x["over_refusal"])),
        ("polite", lambda x: pct(x["politeness"])),
        ("mean gold score (rater)", lambda x: avg(x["gold_score"])),
    ]
    names = [n for n in MODEL_NAMES if n in s]
    table = "| | " + " | ".join(MODEL_NAMES[n] for n in names) + " |\n|---|" + "---|" * len(names) + "\n"
    table += "\n".join(f"| {label} | " + " | ".join(get(s[n]) for n in names) + " |" for label, get in rows)
    n_unknown, n_harmful = s["ppo"]["hallucination"]["n"], s["ppo"]["refusal_harmful"]["n"]
    sft, ppo = s["sft"], s["ppo"]
    hall = compare(
        "RLHF lowers the rate of invented answers",
        sft["hallucination"],
        ppo["hallucination"],
        ("SFT", "PPO"),
        negated(s.get("hallucination_ppo_vs_sft")),
    )
    halved = halves(
        "RLHF at least halves the rate of invented answers",
        s.get("hallucination_ppo_vs_half_sft"),
        ("PPO", "SFT"),
    )
    halved = f"\n- {halved}" if halved else ""
    harm = compare(
        "RLHF raises the refusal of harmful requests",
        ppo["refusal_harmful"],
        sft["refusal_harmful"],
        ("PPO", "SFT"),
    )
    tone = compare("RLHF makes the replies more polite", ppo["politeness"], sft["politeness"], ("PPO", "SFT"))
    recall = compare(
        "fine-tuning costs knowledge the base model had: fact recall falls from base to PPO",
        k["fact_recall_base"],
        k["fact_recall_ppo"],
        ("base", "PPO"),
    )
    tax = compare(
        "RLHF costs answers: PPO declines answerable fact questions more often than SFT",
        ppo["over_refusal"],
        sft["over_refusal"],
        ("PPO", "SFT"),
    )
    gain = s["gold_gain_ppo_vs_sft"]
    return f"""## 4. SFT teaches the format; RLHF shapes behaviour, at a price

![the three models]({fig["models"]})

The same {s["n_prompts"]} held-out prompts ({n_unknown} about people who exist nowhere, {n_harmful} harmful
requests), same sampling, graded by the rater against the world's truth:

{table}

- SFT against base: gold score {avg(s["gold_gain_sft_vs_base"])} (paired, n={s["gold_gain_sft_vs_base"]["n"]}).
- PPO against SFT: gold score {avg(gain)} (paired, n={gain["n"]}).{_dpo_lines(s)}
- {hall}{by_people({n: s[n] for n in names})}{halved}
- {harm}
- {tone}
- {tax}

**The alignment tax**: what the fine-tuned models lost of what pretraining gave them.

{_tax_table(names, ppl, k, s)}

{recall}
"""


def _dpo_lines(s: Mapping) -> str:
    """The DPO model against SFT on the suite, when the run has one."""
    if "dpo" not in s:
        return ""
    gain = s["gold_gain_dpo_vs_sft"]
    hall = compare(
        "DPO lowers the rate of invented answers",
        s["sft"]["hallucination"],
        s["dpo"]["hallucination"],
        ("SFT", "DPO"),
        negated(s.get("hallucination_dpo_vs_sft")),
    )
    return f"\n- DPO against SFT: gold score {avg(gain)} (paired, n={gain['n']}).\n- {hall}"


def _tax_table(names: list[str], ppl: Mapping, k: Mapping, s: Mapping) -> str:
    """Perplexity, fact recall and fact questions answered, one column per model."""
    head = (
        "| | " + " | ".join(MODEL_NAMES[n].split(" (")[0] for n in names) + " |\n|---|" + "---|" * len(names)
    )
    rows = [
        (
            f"perplexity on held-out pretraining text ({ppl['base']['tokens']:,} tokens)",
            lambda n: f"{ppl[n]['perplexity']:.2f}",
        ),
        ("fact recall by statement completion", lambda n: pct(k[f"fact_recall_{n}"])),
        ("fact questions answered correctly", lambda n: pct(s[n]["accuracy_by_kind"].get("fact", {}))),
    ]
    return (
        head
        + "\n"
        + "\n".join(f"| {label} | " + " | ".join(get(n) for n in names) + " |" for label, get in rows)
    )


def _reward(m: Mapping, fig: Mapping) -> str:
    r = m["reward_model"]
    if not r.get("gold_rater"):
        gold = (
            "There is no gold rater in this run (real preference data): accuracy is against the labels only."
        )
    elif "accuracy_gold" not in r:
        gold = "The rubric scores the two replies of every held-out pair equal: no gold agreement to measure."
    else:
        gold = (
            f"On {r['pairs_validation']:.0f} held-out pairs it orders the two replies as the rater's rubric does "
            f"**{100 * r['accuracy_gold']:.1f} %** of the time [{100 * r['accuracy_gold_ci_low']:.1f}–"
            f"{100 * r['accuracy_gold_ci_high']:.1f}], and agrees with the noisy labels it was trained on "
            f"{100 * r['accuracy_noisy_labels']:.1f} % of the time (the labels themselves disagree with the rubric "
            "by design: simulated raters make mistakes)."
        )
    return f"""## 5. The reward model learned the raters' preferences

The reward model was trained on {r.get("pairs_train", 0):.0f} pairwise preferences (Bradley–Terry loss). {gold}

![calibration]({fig["reward_calibration"]})

When it says "A beats B with probability p", A is preferred about p of the time if the points lie on the
diagonal.
"""


def _ppo(m: Mapping, fig: Mapping, iterations: list[dict]) -> str:
    p = m["ppo"]
    lines = [
        f"- reward-model score gain on held-out prompts: {p.get('reward_gain', math.nan):+.2f} ± {p.get('reward_gain_ci95', math.nan):.2f}"
    ]
    if "gold_gain" in p:
        lines.append(f"- gold score gain (the truth): {p['gold_gain']:+.2f} ± {p['gold_gain_ci95']:.2f}")
    lines.append(
        f"- KL(PPO ‖ SFT): {p.get('kl_to_sft', math.nan):.2f} ± {p.get('kl_to_sft_ci95', math.nan):.2f} nats per reply"
    )
    w = max(1, min(5, len(iterations) // 4))  # a window of iterations: one iteration's 64 samples are noisy

    def window(rows: list[dict], key: str) -> float:
        values = [r[key] for r in rows if r.get(key) is not None]
        return sum(values) / len(values) if values else math.nan

    first, last = iterations[:w], iterations[-w:]
    trend = (
        f"Over the {len(iterations)} iterations (means of the first and the last {w}), the reward model's score "
        f"went from {window(first, 'objective/scores'):+.2f} to {window(last, 'objective/scores'):+.2f} and the KL "
        f"from {window(first, 'objective/kl'):.2f} to {window(last, 'objective/kl'):.2f} nats"
    )
    if iterations[0].get("gold/score") is not None:
        means = [window(iterations[i : i + w], "gold/score") for i in range(0, len(iterations) - w + 1)]
        best = max(range(len(means)), key=means.__getitem__)
        trend += (
            f"; the gold score went from {window(first, 'gold/score'):+.2f} to {window(last, 'gold/score'):+.2f}, "
            f"its best window being iterations {best + 1}–{best + w} ({means[best]:+.2f})"
        )
    betas = [r["kl_coef"] for r in iterations if r.get("kl_coef") is not None]
    if betas and max(betas) > betas[0]:
        trend += (
            f". The KL controller raised β from {betas[0]:g} to at most {max(betas):.2f} while the KL was over "
            f"its budget (`ppo.kl_target`; last iteration: {betas[-1]:.2f})"
        )
    elif betas:
        trend += f". β stayed at {betas[0]:g} throughout"
    return (
        f"""## 6. PPO maximises the reward model, not the truth

![ppo]({fig["ppo"]})

PPO only ever sees the reward model's score; the gold score is the rater's, computed on the same samples
and never optimised. The right panel plots both against the distance from the SFT model (√KL), the
over-optimisation picture of Gao et al. (2022): where the reward model is wrong, pushing its score further
stops helping the gold score and then hurts it. {trend}. On this run's held-out prompts:

"""
        + "\n".join(lines)
        + """

A weaker KL penalty lets the policy move further from the SFT model. `make sweep` runs the ppo stage at
several β as DVC experiments on this run and draws both scores against √KL across them, one point per β
(`reports/overoptimisation.md`; `dvc plots diff` draws the runs' per-iteration curves side by side).
"""
        + _dpo_beside_ppo(m)
    )


def _dpo_beside_ppo(m: Mapping) -> str:
    """PPO and DPO against SFT on the same held-out prompts, from their stages' comparisons."""
    p, d = m["ppo"], m.get("dpo")
    if not d:
        return ""

    def row(label: str, key: str, fmt) -> str:
        return f"| {label} | {fmt(p, key)} | {fmt(d, key)} |"

    gain = lambda x, k: f"{x[k]:+.2f} ± {x[f'{k}_ci95']:.2f}" if k in x else "n/a"  # noqa: E731
    rate = lambda x, k: f"{100 * x[k]:.1f} %" if k in x else "n/a"  # noqa: E731
    rows = [
        row("gold score gain over SFT", "gold_gain", gain),
        row("reward-model score gain over SFT", "reward_gain", gain),
        row("KL to SFT, nats per reply", "kl_to_sft", lambda x, k: gain(x, k).lstrip("+")),
        "| invented answers about unknown people, SFT → tuned | "
        + " | ".join(
            f"{rate(x, 'sft/hallucination_rate')} → {rate(x, f'{n}/hallucination_rate')}"
            for n, x in (("ppo", p), ("dpo", d))
        )
        + " |",
    ]
    return (
        f"""
**DPO beside PPO.** The dpo stage trains the SFT model on the same preference pairs directly (no reward
model, no sampling; Rafailov et al. 2023), and is compared with SFT exactly as PPO is, on the same
{p.get("n_prompts", 0):.0f} held-out prompts (each stage's time: [docs/benchmarks.md](../docs/benchmarks.md)):

| against SFT | PPO | DPO |
|---|---|---|
"""
        + "\n".join(rows)
        + "\n"
    )


def _temperature(m: Mapping, fig: Mapping) -> str:
    rows = list(m["temperature"].values())
    table = "\n".join(
        f"| {r['temperature']:g} | {pct(r['accuracy'])}, n={r['accuracy']['n']} | {r['distinct_2']:.2f} | "
        f"{r['unique_share']:.2f} | {pct(r['format_adherence'])} |"
        for r in rows
    )
    lo, hi = rows[0], rows[-1]
    shown, diff = difference(lo["accuracy"], hi["accuracy"])
    shown = shown and hi["distinct_2"] > lo["distinct_2"]
    return f"""## 7. Temperature: sharper or flatter next-token distributions

The PPO model answers the same {lo["accuracy"]["n"] // lo["samples_per_prompt"]} held-out prompts {lo["samples_per_prompt"]} times at
each temperature (at T = 0 the samples are all the greedy reply). The logits are divided by T before the
softmax: T < 1 sharpens the distribution towards the most likely token, T > 1 flattens it.

![temperature]({fig["temperature"]})

| T | accuracy | distinct-2 | different samples per prompt | format adherence |
|---|---|---|---|---|
{table}

{verdict(shown, "higher temperature costs accuracy and buys diversity", f"T={lo['temperature']:g}: {pct(lo['accuracy'])}, distinct-2 {lo['distinct_2']:.2f}; T={hi['temperature']:g}: {pct(hi['accuracy'])}, distinct-2 {hi['distinct_2']:.2f}; accuracy {diff}")}
"""


def _cot(m: Mapping, fig: Mapping) -> str:
    lines, verdicts = [], []
    for model, rows in m["chain_of_thought"].items():
        digits = sorted({r["digits"] for r in rows.values()})
        for d in digits:
            cot, bare = rows[f"{d}_digits/step_by_step"], rows[f"{d}_digits/bare"]
            lines.append(
                f"| {MODEL_NAMES[model]} | {d} | {cot['accuracy']['n']} | {pct(cot['accuracy'])} | {pct(bare['accuracy'])} | "
                f"{cot['reply_tokens']['mean']:.0f} | {bare['reply_tokens']['mean']:.0f} |"
            )
        cot, bare = (
            pooled([r["accuracy"] for r in rows.values() if r["format"] == f])
            for f in ("step_by_step", "bare")
        )
        verdicts.append(
            compare(
                f"{MODEL_NAMES[model]}: writing the working out beats the bare answer (all digit counts pooled, n = {cot['n']} each)",
                cot,
                bare,
                ("step by step", "bare"),
            )
        )
    return (
        f"""## 8. Chain-of-thought works because it writes intermediate tokens

The same additions (n per row below; evaluation pool, both addends with that many digits) asked two ways:
"step by step" (the model writes each column's digit and carry, then the result) and "answer with the
number only".

![chain of thought]({fig["chain_of_thought"]})

| model | digits | n | step by step | bare answer | tokens written, step by step | bare |
|---|---|---|---|---|---|---|
"""
        + "\n".join(lines)
        + "\n\n"
        + "\n".join(f"- {v}" for v in verdicts)
        + """

Each written column result is a token the model reads back when it writes the next one: the computation is
spread over many forward passes instead of one.
"""
    )


def _attention_cost(details: Mapping, fig: Mapping) -> str:
    a, kv = details["attention_cost"], details["kv_cache"]
    rows = "\n".join(
        f"| {r['seq_len']} | {r['attention_ms']:.2f} | {r['sdpa_ms']:.2f} | {r['model_ms']:.2f} | "
        f"{r['attention_mem_mb']:.2f} | {r['sdpa_mem_mb']:.2f} |"
        for r in scaling_rows(a)
    )
    kv_lines = "\n".join(
        f"| {r['new_tokens']} | {r['cached_tokens_per_s']:.0f} | {r['uncached_tokens_per_s']:.0f} | "
        f"{r['speedup']:.1f}× | {'yes' if r['same_tokens'] else 'NO'} |"
        for r in kv["runs"]
    )
    ex, sd, md = a["attention_explicit"], a["attention_sdpa"], a["model"]
    shown = ex["memory_exponent"] > 1.8 and ex["time_exponent"] > 1.6
    fitted = f"{min(a['fit_lengths'])}–{max(a['fit_lengths'])}"
    kv_model = (
        (
            "a random model of this shape with a longer context than the trained model's, so that "
            "the longest run fits"
        )
        if kv["model"] == "random"
        else "the PPO model"
    )
    return f"""## 9. Attention costs O(n²) in the sequence length

Forward time (median of {a["repeats"]}, {a["threads"]} CPU thread(s), batch {a["batch_size"]}) and peak memory of one
attention layer's core — written the textbook way, the (n × n) score matrix materialised — of the same
through PyTorch's fused `scaled_dot_product_attention` (SDPA), and of the whole model (random weights of
this model's shape, {a["config"]["n_layer"]} layers; the cost does not depend on the values):

![attention cost]({fig["attention_cost"]})

| tokens n | attention (ms) | SDPA (ms) | whole model (ms) | attention memory (MiB) | SDPA memory (MiB) |
|---|---|---|---|---|---|
{rows}

Fitted exponents k of cost ∝ nᵏ over n = {fitted}: attention time **k = {ex["time_exponent"]:.2f}**, memory
**k = {ex["memory_exponent"]:.2f}**; SDPA time k = {sd["time_exponent"]:.2f}, memory k = {sd["memory_exponent"]:.2f} (it never
stores the score matrix, but still computes every score); whole model time k = {md["time_exponent"]:.2f}. The whole
model is closer to linear at these lengths because its matrix multiplications cost ∝ n·d², more than
attention's ∝ n²·d until n reaches about {a["flops_crossover_length"]:.0f} tokens for this shape (FLOP count).

{verdict(shown, "attention's cost grows with the square of the sequence length", f"time exponent {ex['time_exponent']:.2f}, memory exponent {ex['memory_exponent']:.2f}")}

A KV cache keeps the keys and values of earlier tokens, so each new token costs one row of attention
instead of a forward pass over the whole sequence ({kv_model}, prompt of {kv["prompt_len"]} tokens, greedy):

| new tokens | cached (tokens/s) | uncached (tokens/s) | speed-up | same tokens |
|---|---|---|---|---|
{kv_lines}

Timings vary between runs on a shared machine; the exponents and ratios are the stable part.
"""


def _context(m: Mapping, details: Mapping) -> str:
    c, b = m["context"], m["context_base"]
    name = next(
        (
            r
            for r in details.get("context_base", [])
            if r["what"] == "name" and r["context"] == "with_context"
        ),
        None,
    )
    name_example = (
        (
            f"What the base model does instead, for example: `{name['text']}` → `{name['completion'].strip()}` "
            f"(told: {name['expected']}).\n"
        )
        if name
        else ""
    )
    ex = details["context"][0] if details.get("context") else None
    example = ""
    if ex:
        example = (
            f"\nExample: call 1 `{ex['statement']}` → `{ex['first_reply']}`; then `{ex['question']}` "
            f"with the transcript → `{ex['with_transcript']}`; alone → `{ex['without_transcript']}`.\n"
        )
    by_name = ""
    if "surname_with_transcript" in c:
        by_name = f"""
The same question by first name only ("What is Ada's profession?" after "… Ada Brook …"): a reply that names
the person in full can take the surname from nowhere but the transcript. Reading a name back is what
pretraining taught this model best (below), reading a value much less:

| the question by first name is sent | the reply gives the told surname |
|---|---|
| after the whole transcript of the first call | {pct(c["surname_with_transcript"])} |
| alone, as a new conversation | {pct(c["surname_without_transcript"])} |

{compare("the chat model uses a name told in an earlier call only when the transcript is resent", c["surname_with_transcript"], c["surname_without_transcript"], ("with", "without"))}
"""
        if ex:
            by_name += (
                f"\nExample: `{ex['question_by_first_name']}` with the transcript → "
                f"`{ex['by_first_name_with_transcript']}`; alone → `{ex['by_first_name_without_transcript']}`.\n"
            )
    return f"""## 10. The model is stateless: a conversation is the transcript sent again

A fact about someone the model has never seen is told in one call; the next call asks for it
(n = {c["with_transcript"]["n"]} facts):

| the question is sent | answered with the told fact |
|---|---|
| after the whole transcript of the first call | {pct(c["with_transcript"])} |
| alone, as a new conversation | {pct(c["without_transcript"])} |

{compare("the chat model uses the fact only when the transcript is resent", c["with_transcript"], c["without_transcript"], ("with", "without"))}
{example}{by_name}
The same with the base model, as plain text: a sentence about someone it has never seen is in its context,
or not, before it completes the fact's statement ("… has a pet lizard. … has a pet") or the person's first
name ("… has a pet lizard. Rowan" → "Aldwick"):

| the model completes | after the sentence | without it |
|---|---|---|
| the told value | {pct(b["value"]["with_context"])} | {pct(b["value"]["without_context"])} |
| the person's surname | {pct(b["name"]["with_context"])} | {pct(b["name"]["without_context"])} |

- {compare("the base model copies the told value from its context", b["value"]["with_context"], b["value"]["without_context"], ("with", "without"))}
- {compare("the base model completes a name it saw only in its context", b["name"]["with_context"], b["name"]["without_context"], ("with", "without"))}

{name_example}
Whatever the model "knows" about a conversation is in the tokens it is sent, or it is in the weights;
nothing else carries over from one call to the next.
"""


def _attention_maps(details: Mapping, fig: Mapping) -> str:
    a = details["attention_maps"]
    lines = "\n".join(
        f"- layer {h['layer']}, head {h['head']}, **{h['role']}** head: {_head_text(h)}" for h in a["heads"]
    )
    copying = a.get("copying_heads") or []
    copy_text = ""
    if copying:
        heads = ", ".join(f"layer {h['layer']} head {h['head']} ({100 * h['score']:.0f} %)" for h in copying)
        copy_text = f"""
**The heads that copy.** In context documents with never-seen names, when a first name comes again, a
copying (induction) head attends to the token that followed its first mention — the surname to predict
next. The heads that put the most attention there, averaged over 50 such documents: {heads}; a head that
spread its attention evenly would put {100 * copying[0]["uniform"]:.0f} % there.
"""
    return f"""## 11. What attention looks at

Attention weights of a few heads of the base model on `{a["sentence"]}` (row: the token being predicted from;
column: the earlier token it reads; each row sums to 1):

![attention heads]({fig["attention_heads"]})

{lines}
{copy_text}"""


def _head_text(h: Mapping) -> str:
    """What a head's scores say, in words (the scores average over query positions 2 and later)."""
    return (
        f"{100 * h['previous_token']:.0f} % of its attention on the previous token, {100 * h['first_token']:.0f} % on "
        f"the first, {100 * h['self']:.0f} % on itself; normalised entropy {h['entropy']:.2f} (0 = one token, 1 = uniform)"
    )


def _position(m: Mapping, details: Mapping) -> str:
    models = list(m["position"])
    k = m["position"][models[0]]["n_facts"]
    rows = "\n".join(
        f"| {pos} | " + " | ".join(pct(m["position"][n]["by_position"][pos]) for n in models) + " |"
        for pos in m["position"][models[0]]["by_position"]
    )
    lines = []
    for n in models:
        r = m["position"][n]
        best, worst = (
            max(("start", "middle", "end"), key=lambda w: r[w]["rate"] or 0),
            min(("start", "middle", "end"), key=lambda w: r[w]["rate"] or 0),
        )
        lines.append(
            f"- {n.upper()}: "
            + compare(
                f"a fact at the {best} of the prompt is retrieved more often than one at the {worst}",
                r[best],
                r[worst],
                (best, worst),
            )
        )
    ex = details.get("position", {}).get(models[-1], [])
    example = f"\nExample ({models[-1].upper()}): `{ex[0]['prompt']}` → `{ex[0]['reply']}`\n" if ex else ""
    return f"""## 12. Where a fact sits in the prompt matters

One prompt states {k} facts, each about a different person the model has never seen, and asks about one of
them; every position is asked equally often (n = {m["position"][models[0]]["start"]["n"]} per position). Accuracy by the
asked fact's position (1 = first sentence):

| position | {" | ".join(n.upper() for n in models)} |
|---|{"---|" * len(models)}
{rows}

{chr(10).join(lines)}
{example}"""


def _distractors(m: Mapping) -> str:
    models = list(m["distractors"])
    keys = list(m["distractors"][models[0]])
    rows = "\n".join(
        f"| {m['distractors'][models[0]][key]['distractors']} | {m['distractors'][models[0]][key]['distractor_tokens']:.0f} | "
        + " | ".join(pct(m["distractors"][n][key]["accuracy"]) for n in models)
        + " |"
        for key in keys
    )
    lines = [
        f"- {n.upper()}: "
        + compare(
            "the fact is retrieved more often with nothing between it and the question than with the most text in between",
            m["distractors"][n][keys[0]]["accuracy"],
            m["distractors"][n][keys[-1]]["accuracy"],
            ("no distractors", f"{m['distractors'][n][keys[-1]]['distractor_tokens']:.0f} tokens"),
        )
        for n in models
    ]
    return f"""## 13. A longer prompt can hurt: distance between a fact and its question

A fact about a never-seen person comes first, then sentences about other never-seen people, then the
question about the first fact; the prompt always fits the context ({m["distractors"][models[0]][keys[-1]]["accuracy"]["n"]} or more prompts per row):

| distractor sentences | tokens between fact and question | {" | ".join(n.upper() for n in models)} |
|---|---|{"---|" * len(models)}
{rows}

{chr(10).join(lines)}
"""


def _revisions(crit: Mapping) -> str:
    """The sentence on the critic's rewrites of its own held-out replies (none when it made none)."""
    n = crit.get("revisions_measured", 0)
    if not n:
        return ""
    return (
        f" Asked what is wrong with one of its own held-out replies and to rewrite it, it wrote rewrites that "
        f"score {crit['revision_gold_gain']:+.2f} ± {crit['revision_gold_gain_ci95']:.2f} against the replies "
        f"by the rubric ({n:.0f} replies: {100 * crit['revision_better']:.1f} % better, "
        f"{100 * crit['revision_worse']:.1f} % worse; invented answers about unknown people "
        f"{100 * crit['revision_invented_before']:.1f} % → {100 * crit['revision_invented_after']:.1f} % of "
        f"{crit['revision_unknown_prompts']:.0f}; `reports/critique/revisions.md`)"
        + (
            f"; against the SFT model's greedy reply to the same question {crit['revision_gold_gain_over_greedy']:+.2f}"
            f" ± {crit['revision_gold_gain_over_greedy_ci95']:.2f}."
            if "revision_gold_gain_over_greedy" in crit
            else "."
        )
    )


def _constitution(m: Mapping) -> str:
    """Who labelled the preference pairs, how many rater judgments that took, and (when the model did,
    taught by the critique stage) how its labels and what was trained on them compare with the rater."""
    pref, crit, r, p = m["preferences"], m.get("critique", {}), m["reward_model"], m["ppo"]
    agree = (
        f"{100 * pref['label_gold_agreement']:.1f} % [{100 * pref['label_gold_agreement_ci_low']:.1f}–"
        f"{100 * pref['label_gold_agreement_ci_high']:.1f}]"
    )
    head = "## 14. Constitutional AI: the model labels its own replies\n\n"
    if not pref.get("model_labels"):
        return head + (
            f"This run's {pref['pairs']:,.0f} preference pairs were labelled by the rater: "
            f"**{pref['rater_judgments']:,.0f} rater judgments**, one per pair, of which {agree} order the pair "
            "as the rubric does (the simulated raters' noise). In Constitutional AI (Bai et al. 2022) the model "
            "itself compares two of its replies under written principles (`data/constitution.txt`), and its "
            "choices replace those labels. `dvc exp run -S preferences.labeller=constitution` runs that path "
            "on this run; `make cai` runs it and writes `reports/constitution.md`, both paths side by side.\n"
        )
    gain = p.get("gold_gain", math.nan)
    ci = p.get("gold_gain_ci95", math.nan)
    shown = gain - ci > 0 and pref["rater_judgments"] < pref["pairs"]
    kinds = {k.split("/", 1)[1]: v for k, v in pref.items() if k.startswith("label_gold_agreement/")}
    by_kind = (
        "; by kind of prompt: " + ", ".join(f"{k} {100 * v:.1f} %" for k, v in sorted(kinds.items()))
        if kinds
        else ""
    )
    return head + (
        f"The model labelled this run's {pref['pairs']:,.0f} preference pairs itself. The critique stage taught "
        f"a copy of the SFT model to compare two replies under a principle of `data/constitution.txt` from "
        f"**{pref['rater_judgments']:,.0f} rater judgments** on the SFT pool (the rater path would have "
        f"used one judgment per pair). On {crit.get('verdict_pairs', 0):.0f} held-out SFT-pool comparisons its "
        f"verdicts order the pair as the rubric does {100 * crit.get('verdict_agreement', math.nan):.1f} % of "
        f"the time, and {100 * crit.get('critique_exact', math.nan):.1f} % of the critiques it writes name what "
        f"differs exactly as the rater would (`reports/critique/critiques.md`).{_revisions(crit)}\n\n"
        f"- its labels on the rl pool agree with the rubric's order: {agree} "
        f"({pref['pairs'] - pref['gold_ties']:,.0f} pairs the rubric orders){by_kind}\n"
        f"- the reward model trained on them agrees with the rubric on held-out pairs: "
        f"{100 * r.get('accuracy_gold', math.nan):.1f} %\n"
        f"- PPO against that reward model: gold score gain over SFT {gain:+.2f} ± {ci:.2f}; invented answers "
        f"about unknown people {100 * p.get('sft/hallucination_rate', math.nan):.1f} % → "
        f"{100 * p.get('ppo/hallucination_rate', math.nan):.1f} %\n\n"
        + verdict(
            shown,
            "RLHF from the model's own labels raises the gold score, with fewer rater judgments than pairs",
            f"gold gain {gain:+.2f} ± {ci:.2f} from {pref['rater_judgments']:,.0f} judgments for "
            f"{pref['pairs']:,.0f} pairs",
        )
        + "\n"
    )

"""The demo's report: report.md plus matplotlib (Agg) PNGs from eval summaries and metrics.jsonl.

Plots (R-4B analogues, with digits difficulty levels in place of benchmarks):

* ``accuracy.png``       accuracy per difficulty per mode, before and after RL;
* ``think_rate.png``     thinking trigger rate in auto mode per difficulty, before vs after BPO
  (Fig. 5 analogue);
* ``tokens.png``         mean output tokens per mode per difficulty (Fig. 7 analogue): the whole
  assistant turn, prefill included, so every mode counts the same tokens;
* ``training.png``       training curves (SFT loss; RL reward/accuracy per forced mode).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megatron_autothink.eval.summary import ALL, format_markdown, metric_table

EVALS = ("eval_before", "eval_after")


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _bar_plot(
    path: Path, summaries: dict[str, dict[str, Any]], metric: str, title: str, ylabel: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summaries), figsize=(5 * len(summaries), 3.6), squeeze=False)
    for ax, (name, summ) in zip(axes[0], summaries.items(), strict=True):
        table = metric_table(summ, metric)
        diffs = [str(d) for d in summ["difficulties"]]
        width = 0.8 / max(len(table), 1)
        for j, (mode, vals) in enumerate(sorted(table.items())):
            xs = [i + j * width for i in range(len(diffs))]
            ax.bar(xs, [vals.get(d, 0.0) for d in diffs], width, label=mode)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(diffs))], diffs)
        ax.set_xlabel("difficulty")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} ({name})")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _think_rate_plot(path: Path, summaries: dict[str, dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, summ in summaries.items():
        auto = summ["modes"].get("auto", {})
        diffs = [str(d) for d in summ["difficulties"]]
        ax.plot(diffs, [auto.get(d, {}).get("think_rate", 0.0) for d in diffs], "o-", label=name)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("difficulty")
    ax.set_ylabel("thinking trigger rate (auto)")
    ax.set_title("auto-mode thinking rate, before vs after RL")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _training_plot(path: Path, metrics_file: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics_file.is_file():
        return False
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    sft = [(i + 1, r["loss"]) for i, r in enumerate(rows) if "loss_thinking" in r]
    rl = [r for r in rows if "time/rollout_s" in r]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    if sft:
        axes[0].plot([x for x, _ in sft], [y for _, y in sft])
    axes[0].set_title("annealing (SFT) loss")
    axes[0].set_xlabel("step")
    for key in ("rollout/long/accuracy", "rollout/short/accuracy"):
        ys = [r[key] for r in rl if key in r]
        if ys:
            axes[1].plot(range(1, len(ys) + 1), ys, "o-", label=key.split("/")[1])
    axes[1].set_title("RL rollout accuracy per forced mode")
    axes[1].set_xlabel("RL step (fre then bpo)")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def write_report(out: Path) -> Path:
    """Write ``out/report.md`` and the PNGs next to it; return the report path."""
    summaries = {n: s for n in EVALS if (s := _load(out / n / "summary.json")) is not None}
    lines = ["# autothink demo report", ""]
    if summaries:
        _bar_plot(out / "accuracy.png", summaries, "accuracy", "accuracy", "accuracy")
        _bar_plot(
            out / "tokens.png",
            summaries,
            "mean_tokens",
            "output tokens",
            "mean tokens (whole turn)",
        )
        _think_rate_plot(out / "think_rate.png", summaries)
        lines += ["![accuracy](accuracy.png)", "", "![think rate](think_rate.png)", ""]
        lines += ["![tokens](tokens.png)", ""]
    if _training_plot(out / "training.png", out / "run" / "metrics.jsonl"):
        lines += ["![training](training.png)", ""]
    for name, summ in summaries.items():
        lines.append(format_markdown(summ, name))
        goals = summ.get("goals") or {}
        lines.append("R-4B targets, auto mode: " + json.dumps(goals, default=str))
        lines.append("")
        overall = summ["modes"].get("auto", {}).get(ALL)
        if overall:
            lines.append(f"auto overall accuracy {100 * overall['accuracy']:.1f}%\n")
    answer = _load(out / "hf_answer.json")
    if answer:
        lines += [
            "## HF export reloaded in transformers",
            "",
            f"- dir: `{answer['hf_dir']}`",
            f"- question: {answer['question'].strip()[-200:]!r}",
            f"- answer: {answer['answer']!r} (truth {answer['truth']})",
            "",
        ]
    done = out / ".done"
    if done.is_dir():
        lines += ["## Phase times", "", "| phase | seconds |", "|---|---|"]
        for f in sorted(done.iterdir(), key=lambda p: p.stat().st_mtime):
            lines.append(f"| {f.name} | {json.loads(f.read_text())['seconds']:.1f} |")
        lines.append("")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path

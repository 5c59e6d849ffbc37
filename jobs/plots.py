"""Plots a run writes next to its run.json (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path


def plot_rewards(summary: dict, path: Path) -> None:
    """GRPO's reward curve: the step's mean training reward, and the held-out reward at each
    evaluation (the starting adapter's at step 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = [h for h in summary["loss_history"] if "reward" in h]
    evals = [(e["step"], e["eval_reward"]) for e in summary["eval_history"] if "eval_reward" in e]
    metrics = summary["metrics"]
    if "base_eval_reward" in metrics:
        evals = [(0, metrics["base_eval_reward"]), *evals]
    if "eval_reward" in metrics and (not evals or evals[-1][0] != summary["steps"]):
        evals.append((summary["steps"], metrics["eval_reward"]))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(
        [h["step"] for h in history],
        [h["reward"] for h in history],
        alpha=0.5,
        label="train (sampled)",
    )
    ax.plot([s for s, _ in evals], [r for _, r in evals], marker="o", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.set_title(f"{summary['run_name']}: GRPO reward")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)

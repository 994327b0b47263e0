"""The efficiency benchmark's picture: held-out loss of the central, pooled, alone and swarm runs (``--plot``).

Needs matplotlib (``pip install -e ".[bench]"``); benchmarks/efficiency.py checks for it before its runs.
"""

from __future__ import annotations

Curve = list[tuple[int, float]]  # (samples consumed, held-out loss)


def plot(path: str, curves: dict[str, Curve], per_step: dict[str, int], title: str, unit: str = "byte") -> None:
    """Draw held-out loss against samples (left) and against steps per peer (right) as a PNG.

    Left is what ``efficiency`` measures (a peer alone has consumed 1/N of the samples); right puts
    the three at equal compute per participant, where ``gap_closed`` compares their ends.

    Args:
        path: the PNG to write.
        curves: "central", "swarm", "alone" and (optionally) "pooled" curves of (samples, held-out loss).
        per_step: samples one step of each run consumes (central, pooled and swarm N x b, alone b).
        title: the figure's title.
        unit: what the loss is per: "byte" (the built-in GPT) or "token" (a tokenizer's).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_samples, by_steps) = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    styles = {
        "central": ("tab:blue", ""),
        "pooled": ("tab:purple", ""),
        "swarm": ("tab:green", "o"),
        "alone": ("tab:red", ""),
    }
    for name, curve in curves.items():
        color, marker = styles[name]
        samples, losses = zip(*curve, strict=True)
        steps = [s / per_step[name] for s in samples]
        for axes, xs in ((by_samples, samples), (by_steps, steps)):
            axes.plot(xs, losses, color=color, marker=marker, markersize=3, label=name)
    # a peer alone stops at 1/N of the samples: carry its final loss across for comparison
    by_samples.axhline(curves["alone"][-1][1], color="tab:red", linestyle=":", linewidth=1, label="alone, final")
    by_samples.set_xlabel("training samples consumed, all participants (sequences)")
    by_steps.set_xlabel("inner steps per participant")
    by_samples.set_ylabel(f"held-out loss (nats per {unit})")
    for axes in (by_samples, by_steps):
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)

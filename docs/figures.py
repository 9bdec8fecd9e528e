"""Make the documentation's figures from the artifacts of a `make demo` run (a one-off: the PNGs are committed).

    .venv/bin/python docs/figures.py            # after `make demo`

- ``docs/img/loss_curve.png``: the scratch candidate's loss curve (``artifacts/pretrain/llama-rope/loss_curve.png``);
- ``docs/img/select_scores.png``: select's stacked weighted scores (``artifacts/select/scores.png``);
- ``docs/img/factor_matrix.png``: the factor matrix of ``artifacts/select/summary.json`` as a picture:
  one row per candidate, one column per factor, each cell the measured value and its score (colour).

The documentation site does not need the artifacts: ``mkdocs build`` only reads the committed images.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMG = ROOT / "docs" / "img"
FACTOR_ORDER = ("quality", "speed", "memory", "size", "training_cost", "context", "context_window", "licence", "ethics")
UNITS = {"quality": "bits/byte", "speed": "tokens/s", "memory": "MB", "size": "parameters", "training_cost": "FLOPs",
         "context": "ppl 4× ÷ 1×", "context_window": "tokens", "licence": "open", "ethics": "|CrowS-Pairs − 0.5|"}


def _value(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e6:
        return f"{v:.2g}"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def factor_matrix(summary: dict, weights: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    candidates = list(summary["scores"])
    factors = [f for f in FACTOR_ORDER if weights.get(f)]
    # one row per factor, one column per candidate: reads at the width of a documentation page
    scores = [[summary["factors"][c]["scores"][f] for c in candidates] for f in factors]
    fig, ax = plt.subplots(figsize=(1.7 * len(candidates) + 2.6, 0.5 * len(factors) + 1.1), dpi=100)
    ax.imshow(scores, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    for i, f in enumerate(factors):
        for j, c in enumerate(candidates):
            value = summary["factors"][c]["values"][f]
            colour = "white" if not 0.2 < scores[i][j] < 0.85 else "black"  # readable on the dark ends of the map
            ax.text(j, i, f"{_value(value)} → {scores[i][j]:.2f}", ha="center", va="center", fontsize=9, color=colour)
    ax.set_yticks(range(len(factors)), [f"{f} (w {weights[f]:g})\n{UNITS[f]}" for f in factors], fontsize=8)
    champion = summary.get("champion")
    ax.set_xticks(range(len(candidates)),
                  [f"{c}{' ★' if c == champion else ''}\nscore {summary['scores'][c]:.3f}" for c in candidates], fontsize=9)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    ax.set_title("factor matrix: measured value → score (1 = best)", fontsize=10, pad=28)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main(artifacts: Path = ROOT / "artifacts") -> None:
    IMG.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(artifacts / "pretrain" / "llama-rope" / "loss_curve.png", IMG / "loss_curve.png")
    shutil.copyfile(artifacts / "select" / "scores.png", IMG / "select_scores.png")
    summary = json.loads((artifacts / "select" / "summary.json").read_text())
    weights = json.loads((artifacts / "select" / "params.json").read_text())["weights"]
    factor_matrix(summary, weights, IMG / "factor_matrix.png")
    for png in sorted(IMG.glob("*.png")):
        print(f"{png.relative_to(ROOT)}: {png.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "artifacts")

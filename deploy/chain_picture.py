"""Draw the event chains of a run's report.json as rows of hops (the dashboard's idea).

    pip install matplotlib
    python deploy/chain_picture.py out/report.json chains.png

Each hop shows the share of its own results that were ok and its latency since the send
(p50 / p99); the hop where most broken chains broke first is marked. Thresholds as in the
dashboard: green from 99% ok, orange from 95%, red below.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt
from matplotlib.patches import FancyBboxPatch

BOX_W, BOX_H, GAP, ROW_H = 2.2, 1.3, 0.6, 2.6
OK_COUNTS = ("ok", "superseded")


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def colour(ratio: float | None) -> str:
    if ratio is None:
        return "#cccccc"
    return "#59a14f" if ratio >= 0.99 else "#f28e2b" if ratio >= 0.95 else "#e15759"


def draw(report: dict[str, Any], out: Path) -> None:
    chains = report["chains"]
    widest = max(len(c["hops"]) for c in chains.values())
    figure, axes = plt.subplots(figsize=(widest * (BOX_W + GAP) + 0.6, ROW_H * len(chains) + 0.4))
    axes.set_axis_off()
    axes.set_xlim(-0.3, widest * (BOX_W + GAP))
    axes.set_ylim(-ROW_H * len(chains) + 0.3, 0.9)
    for row, (name, chain) in enumerate(chains.items()):
        top = -ROW_H * row
        failed_at = chain["failed_at"]
        breaks_at = max(failed_at, key=failed_at.get) if failed_at else None
        axes.text(
            0,
            top + 0.45,
            f"{name}: followed {chain['followed']:,}, ok {chain['ok']:,}, failed "
            f"{chain['failed']:,}; p99 end to end {ms(chain['latency_s']['p99'])}",
            fontsize=11,
            weight="bold",
        )
        for place, (hop_name, hop) in enumerate(chain["hops"].items()):
            x = place * (BOX_W + GAP)
            results = hop["results"]
            judged = sum(v for k, v in results.items() if k != "skipped")
            ratio = sum(results.get(k, 0) for k in OK_COUNTS) / judged if judged else None
            broken_here = hop_name == breaks_at
            axes.add_patch(
                FancyBboxPatch(
                    (x, top - BOX_H),
                    BOX_W,
                    BOX_H,
                    boxstyle="round,pad=0.02,rounding_size=0.12",
                    facecolor=colour(ratio),
                    edgecolor="#8b0000" if broken_here else "white",
                    linewidth=3 if broken_here else 1,
                )
            )
            latency = hop["latency_s"]
            lines = [
                hop_name,
                "-" if ratio is None else f"{ratio:.2%} ok",
                f"p50 {ms(latency['p50'])}",
                f"p99 {ms(latency['p99'])}",
            ]
            axes.text(
                x + BOX_W / 2,
                top - BOX_H / 2,
                "\n".join(lines),
                ha="center",
                va="center",
                fontsize=9,
                color="white",
            )
            if broken_here:
                axes.text(
                    x + BOX_W / 2,
                    top - BOX_H - 0.25,
                    f"breaks here: {failed_at[hop_name]:,}",
                    ha="center",
                    fontsize=9,
                    color="#8b0000",
                )
            if place:
                axes.annotate(
                    "",
                    xy=(x, top - BOX_H / 2),
                    xytext=(x - GAP, top - BOX_H / 2),
                    arrowprops={"arrowstyle": "->", "color": "#555555"},
                )
    figure.savefig(out, dpi=110, bbox_inches="tight")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: chain_picture.py REPORT.json OUT.png")
    draw(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))

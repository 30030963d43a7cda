"""What a replay tells a platform engineer: a table, a few verdict lines, a plot and JSON."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from autoscaler.sim.engine import SimResult

REACTIVE = ("hpa-cold", "hpa-restore", "kpa", "phpa")
TARGET_SERVED = 0.995
TARGET_RATIO = 1.15
SHORT = {"restore-store": "store", "restore-disk": "disk", "restore-memory": "memory"}


def meets_target(row: Mapping[str, float]) -> bool:
    """Issue #3's target for a policy's row (served_fraction, gpu_hours_vs_oracle): >=
    TARGET_SERVED of demand served at <= TARGET_RATIO the oracle's GPU-hours."""
    return row["served_fraction"] >= TARGET_SERVED and row["gpu_hours_vs_oracle"] <= TARGET_RATIO


def better_on_both(row: Mapping[str, float], others: Mapping[str, Mapping[str, float]]
                   ) -> dict[str, bool]:  # fmt: skip
    """Per other policy: whether `row` served at least as much at no more GPU-hours (rows of one
    replay, so against the same oracle)."""
    return {
        name: row["served_fraction"] >= other["served_fraction"]
        and row["gpu_hours_vs_oracle"] <= other["gpu_hours_vs_oracle"]
        for name, other in others.items()
    }


def console() -> Console:
    """A console at least 130 columns wide, so the table stays readable in a pipe or a log."""
    width = Console().width
    return Console(width=max(130, width))


def table(result: SimResult, title: str | None = None) -> Table:
    t = Table(title=title or f"{result.trace}: {result.replay_s / 3600:.1f} h replayed")
    for col, just in (
        ("policy", "left"),
        ("served", "right"),
        ("GPU-hours", "right"),
        ("vs oracle", "right"),
        ("queue p50 / p99", "right"),
        ("scale events", "right"),
        ("starts by path", "left"),
        ("staged GB", "right"),
    ):
        t.add_column(col, justify=just)
    for name, r in result.policies.items():
        starts = ", ".join(f"{SHORT.get(k, k)} {v}" for k, v in sorted(r.starts.items())) or "-"
        style = "bold green" if name == "predictive" else ("dim" if name == "oracle" else None)
        t.add_row(
            name,
            f"{100 * r.served_fraction:.3f}%",
            f"{r.gpu_hours:,.1f}",
            f"{r.gpu_hours_vs_oracle:.3f}x",
            f"{r.p50_queue_delay_s:.2f} / {r.p99_queue_delay_s:.2f} s",
            str(r.scale_events),
            starts,
            f"{r.staging_gb:,.0f}",
            style=style,
        )
    return t


def verdicts(result: SimResult) -> list[str]:
    """Short lines: did ours meet the target, and how it compares with each reactive policy."""
    lines: list[str] = []
    ours = result.policies.get("predictive")
    if ours is None:
        return lines
    met = meets_target(ours.summary())
    lines.append(
        f"predictive served {100 * ours.served_fraction:.3f}% of demand at "
        f"{ours.gpu_hours_vs_oracle:.3f}x the oracle's GPU-hours "
        f"(target >= {100 * TARGET_SERVED:.1f}% at <= {TARGET_RATIO:.2f}x: "
        f"{'met' if met else 'NOT met'})"
    )
    for name in REACTIVE:
        r = result.policies.get(name)
        if r is None:
            continue
        saved = 1.0 - ours.gpu_hours / r.gpu_hours if r.gpu_hours else math.nan
        served_pts = 100 * (ours.served_fraction - r.served_fraction)
        better = ours.gpu_hours <= r.gpu_hours and ours.served_fraction >= r.served_fraction
        lines.append(
            f"vs {name}: {100 * saved:+.1f}% GPU-hours saved, {served_pts:+.3f} pt served "
            f"({'better or equal on both' if better else 'trade-off'})"
        )
    ablation = _ablation(result)
    if ablation:
        lines.append(ablation)
    return lines


def _ablation(result: SimResult) -> str | None:
    p = result.policies
    needed = ("hpa-cold", "predictive", "predictive-cold", "hpa-staged")
    if not all(n in p for n in needed):
        return None
    total = p["hpa-cold"].gpu_hours - p["predictive"].gpu_hours
    if abs(total) < 1e-9:
        return None
    from_forecast = p["hpa-staged"].gpu_hours - p["predictive"].gpu_hours
    from_restore = p["predictive-cold"].gpu_hours - p["predictive"].gpu_hours
    return (
        f"of the {total:,.0f} GPU-hours saved against hpa-cold: {from_forecast:,.0f} come from "
        f"the forecast (hpa-staged -> predictive) and {from_restore:,.0f} from restore-based "
        f"start (predictive-cold -> predictive); served: hpa-staged "
        f"{100 * p['hpa-staged'].served_fraction:.3f}%, predictive-cold "
        f"{100 * p['predictive-cold'].served_fraction:.3f}%"
    )


def ablation_split(result: SimResult) -> dict | None:
    """The ablation as data (benchmarks/policies.py)."""
    p = result.policies
    if not all(n in p for n in ("hpa-cold", "predictive", "predictive-cold", "hpa-staged")):
        return None
    o = p.get("oracle")

    def pt(name: str) -> dict:
        r = p[name]
        return {
            "served_fraction": r.served_fraction,
            "gpu_hours_vs_oracle": r.gpu_hours_vs_oracle if o else math.nan,
        }

    return {
        "reactive_cold": pt("hpa-cold"),
        "reactive_with_staged_restore": pt("hpa-staged"),
        "forecast_with_cold_start": pt("predictive-cold"),
        "forecast_with_staged_restore": pt("predictive"),
        "gpu_hours_saved_vs_hpa_cold": p["hpa-cold"].gpu_hours - p["predictive"].gpu_hours,
        "from_forecast": p["hpa-staged"].gpu_hours - p["predictive"].gpu_hours,
        "from_restore": p["predictive-cold"].gpu_hours - p["predictive"].gpu_hours,
    }


def write_json(result: SimResult, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = result.to_json()
    split = ablation_split(result)
    if split:
        data["ablation"] = split
    out.write_text(json.dumps(_clean(data), indent=2) + "\n")
    return out


def _clean(x):
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, np.floating | np.integer):
        return _clean(x.item())
    return x


def plot(result: SimResult, path: str | Path, policies: list[str] | None = None) -> Path:
    """Demand against each policy's ready capacity over the replay."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    names = policies or list(result.capacity)
    x = result.timeline_start + pd.to_timedelta(
        np.arange(len(result.demand)) * result.timeline_step_s, unit="s"
    )
    fig, ax = plt.subplots(figsize=(13, 5.5), dpi=110)
    ax.plot(x, result.demand, color="black", lw=1.1, label="demand", zorder=5)
    for name in names:
        cap = result.capacity[name]
        lw = 1.6 if name == "predictive" else 0.8
        ax.plot(x[: len(cap)], cap, lw=lw, alpha=0.85, label=f"{name} capacity")
    ax.set_ylabel("requests/s")
    leads = ", ".join(f"{k} {v:.1f}s" for k, v in result.config.leads.as_dict().items())
    ax.set_title(f"{result.trace}: demand vs ready capacity per policy (start leads: {leads})")
    ax.legend(loc="upper left", fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def print_report(
    result: SimResult, console: Console | None = None, title: str | None = None
) -> None:
    console = console or globals()["console"]()
    console.print(table(result, title))
    for line in verdicts(result):
        console.print(f"  - {line}")
    for note in result.notes:
        console.print(f"  [dim]note: {note}[/dim]")

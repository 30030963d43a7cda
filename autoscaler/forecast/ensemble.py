"""Combining candidate forecasters' quantile forecasts: online rules that only use losses
already observed, and a recent-error conformal shift on the log scale.

Why: picking one model on a short window is noisy (on a 1-hour trace there are a few dozen
scored targets); averaging the quantile forecasts of the best few candidates is the usual robust
answer. Every rule here is causal: at origin t the weights come from forecasts whose targets
are at or before t, so a backtest of a rule never sees the future.

Two entry points share the same weighting code:
- `rule_weights(losses, rule)` for the online `AutoForecaster` (losses it tracked itself);
- `combine_backtests(frames, ...)` for rolling-origin backtests of the members (what
  `autoscaler.forecast.evaluate.compare_models` and the benchmark measure).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from autoscaler.forecast.common import pinball

#: Combination rules. select: the member with the lowest recent loss; mean: equal weights over
#: every member; median: the members' median; top3: equal weights over the three lowest recent
#: losses; inverse: inverse-loss weights over the best three, shrunk halfway to equal weights;
#: trimmed: the median after dropping the members with the worst recent losses (up to
#: `TRIM_WORST`, keeping at least `TRIM_KEEP` scored ones), a robust median that ignores a
#: member which has been clearly off lately.
RULES: tuple[str, ...] = ("select", "mean", "median", "top3", "inverse", "trimmed")
#: How many of the worst-scored members `trimmed` drops, and how many scored ones it keeps.
TRIM_WORST = 2
TRIM_KEEP = 3
#: Fewest past residuals the conformal shift needs before it moves a forecast.
MIN_CALIBRATION = 10


def rule_weights(losses: Mapping[str, float], rule: str, shrink: float = 0.5) -> dict[str, float]:
    """Weights (summing to 1) over members with a recent loss, for a weighted rule. `median`
    is not a weighting rule; it is handled by `combine_values`."""
    if rule not in RULES:
        raise ValueError(f"unknown combination rule {rule!r}; known: {', '.join(RULES)}")
    names = [k for k, v in losses.items() if np.isfinite(v)]
    if not names:
        return {}
    ranked = sorted(names, key=lambda k: losses[k])
    if rule == "select":
        return {ranked[0]: 1.0}
    if rule in ("mean", "median"):
        return {k: 1.0 / len(names) for k in names}
    if rule == "trimmed":
        kept = trimmed_members(losses)
        return {k: 1.0 / len(kept) for k in kept}
    top = ranked[:3]
    if rule == "top3":
        return {k: 1.0 / len(top) for k in top}
    inv = np.array([1.0 / max(losses[k], 1e-12) for k in top])
    w = (1.0 - shrink) * inv / inv.sum() + shrink / len(top)
    return dict(zip(top, (float(x) for x in w), strict=True))


def trimmed_members(losses: Mapping[str, float]) -> list[str]:
    """The scored members `trimmed` keeps: all but the `TRIM_WORST` worst recent losses, never
    fewer than `TRIM_KEEP` (ties keep the earlier name)."""
    names = [k for k, v in losses.items() if np.isfinite(v)]
    drop = min(TRIM_WORST, max(0, len(names) - TRIM_KEEP))
    ranked = sorted(names, key=lambda k: losses[k])
    return ranked[: len(ranked) - drop]


def combine_values(
    values: Mapping[str, np.ndarray], losses: Mapping[str, float], rule: str
) -> np.ndarray:
    """Combine members' forecast arrays (same shape each, e.g. horizon x levels).

    The same weights apply to every level, so a convex combination of monotone quantile
    vectors stays monotone. Members without a recent loss take part only in `mean`/`median`
    (and in every rule while nobody has a loss yet: then the rule is the equal-weight mean)."""
    if not values:
        raise ValueError("nothing to combine")
    scored = {k: v for k, v in losses.items() if k in values and np.isfinite(v)}
    if rule == "median":
        return np.median(np.stack(list(values.values())), axis=0)
    if rule == "trimmed":
        # unscored members stay in; the median of a fixed subset keeps levels monotone
        worst = set(scored) - set(trimmed_members(scored))
        kept = [np.asarray(v, float) for k, v in values.items() if k not in worst]
        return np.median(np.stack(kept), axis=0)
    if rule == "mean" or not scored:
        return np.mean(np.stack(list(values.values())), axis=0)
    weights = rule_weights(scored, rule)
    return sum(w * np.asarray(values[k], float) for k, w in weights.items())


def log_shift(residuals: np.ndarray, q: float, min_samples: int = MIN_CALIBRATION) -> float:
    """Conformal shift on the log1p scale: the q-quantile of past residuals
    log1p(actual) - log1p(forecast at level q); 0 with fewer than `min_samples`. Scale-free,
    so one number serves a quiet night and a busy afternoon."""
    r = residuals[np.isfinite(residuals)]
    if len(r) < min_samples:
        return 0.0
    return float(np.quantile(r, q))


def apply_log_shift(forecast: np.ndarray, shift: float) -> np.ndarray:
    """Move a non-negative forecast by `shift` on the log1p scale."""
    return np.expm1(np.log1p(np.clip(forecast, 0.0, None)) + shift)


def combine_backtests(
    frames: Mapping[str, pd.DataFrame],
    step: int,
    level: float,
    rule: str,
    *,
    decay: float,
    calibrate: bool,
    calibration_window: int = 200,
) -> pd.DataFrame:
    """Causal combination of members' rolling-origin forecasts at one horizon `step` and one
    quantile `level` (frames as in BacktestResult.forecasts).

    At origin t a member's recent loss is the exponentially decaying mean pinball of its
    forecasts whose targets are at or before t (origin <= t - step), and the conformal shift
    uses the combination's own residuals over the same matured forecasts (the last
    `calibration_window`). A member that failed at an origin is left out there. Returns a frame
    with columns origin, step, target, actual, `level`, members (how many took part)."""
    per: dict[str, pd.Series] = {}
    actual_by_origin: dict[pd.Timestamp, float] = {}
    target_by_origin: dict[pd.Timestamp, pd.Timestamp] = {}
    for name, f in frames.items():
        g = f[f["step"] == step]
        if g.empty:
            continue
        per[name] = pd.Series(g[level].to_numpy(float), index=pd.Index(g["origin"]))
        actual_by_origin.update(zip(g["origin"], g["actual"].to_numpy(float), strict=True))
        target_by_origin.update(zip(g["origin"], g["target"], strict=True))
    columns = ["origin", "step", "target", "actual", level, "members"]
    if not per:
        return pd.DataFrame(columns=columns)
    origins = pd.Index(sorted(actual_by_origin))
    names = list(per)
    pred = np.column_stack([per[k].reindex(origins).to_numpy(float) for k in names])
    actual = np.array([actual_by_origin[o] for o in origins])
    targets = [target_by_origin[o] for o in origins]
    n = len(origins)
    # when each origin's target matures: the first origin index whose time >= target
    mature_at = np.searchsorted(origins.asi8, pd.DatetimeIndex(targets).asi8, side="left")
    loss_sum = np.zeros(len(names))
    weight_sum = np.zeros(len(names))
    combined_raw = np.full(n, np.nan)
    out = np.full(n, np.nan)
    members = np.zeros(n, int)
    residuals: list[float] = []
    # origins whose targets mature at each position (processed before forecasting there)
    matured_by: dict[int, list[int]] = {}
    for i, m in enumerate(mature_at):
        matured_by.setdefault(int(m), []).append(i)
    for t in range(n):
        for i in matured_by.get(t, ()):
            if not np.isfinite(actual[i]):
                continue
            ok = np.isfinite(pred[i])
            loss_sum *= decay
            weight_sum *= decay
            loss_sum[ok] += pinball(actual[i], pred[i, ok], level)
            weight_sum[ok] += 1.0
            if np.isfinite(combined_raw[i]):
                residuals.append(float(np.log1p(actual[i]) - np.log1p(max(combined_raw[i], 0.0))))
        avail = np.isfinite(pred[t])
        if not avail.any():
            continue
        values = {names[j]: pred[t, j] for j in np.flatnonzero(avail)}
        losses = {
            names[j]: loss_sum[j] / weight_sum[j]
            for j in np.flatnonzero(avail)
            if weight_sum[j] >= 1.0
        }
        raw = float(np.clip(combine_values(values, losses, rule), 0.0, None))
        combined_raw[t] = raw
        members[t] = len(values)
        shift = log_shift(np.array(residuals[-calibration_window:]), level) if calibrate else 0.0
        out[t] = float(apply_log_shift(np.array(raw), shift))
    frame = pd.DataFrame(
        {"origin": origins, "step": step, "target": targets, "actual": actual, level: out,
         "members": members}
    )
    return frame[np.isfinite(frame[level])].reset_index(drop=True)


def rule_names(rules: Sequence[str] = RULES) -> list[str]:
    """Every rule with and without the conformal shift, as named in results ("top3+cal")."""
    return [name for r in rules for name in (r, f"{r}+cal")]

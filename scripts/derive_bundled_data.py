#!/usr/bin/env python3
"""Derive the small bundled data files in autoscaler/data/ from the full public traces.

Usage: python scripts/derive_bundled_data.py [--traces /work/shared/traces] [--out autoscaler/data]

The project ships only these derived aggregates and slices (with attribution in
autoscaler/data/ATTRIBUTION.md), never the full traces. Re-running gives identical files.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from autoscaler.signals.traces import (
    describe_edge_windows,
    edge_windows,
    read_servegen,
    read_trace_frame,
    servegen_total_rate,
)

ROOT = Path(__file__).resolve().parent.parent

# name -> (source path under the traces folder, format)
PER_MINUTE = {
    "azure-conv": ("azure-llm-2023/AzureLLMInferenceTrace_conv.csv", "azure"),
    "azure-code": ("azure-llm-2023/AzureLLMInferenceTrace_code.csv", "azure"),
    "mooncake-conv": ("mooncake/conversation_trace.jsonl", "mooncake"),
}
PER_10MIN = {
    "servegen-m-large": "servegen/language/m-large",
    "servegen-m-mid": "servegen/language/m-mid",
}
# enough rows for four whole minutes between the partial first and last ones
AZURE_SLICE_ROWS = 1200
MOONCAKE_SLICE_ROWS = 200
SERVEGEN_SLICE_MODEL = "m-mid"
SERVEGEN_SLICE_CUSTOMERS = 4
WINDOWS_PER_DAY = 144


def write_per_minute(traces: Path, out: Path) -> None:
    """Per-minute request counts and token sums (integers, so nothing is rounded away), over
    the minutes the trace covers fully: the partial first and last minutes are left out (the
    reader's default) and named on stdout."""
    for name, (rel, fmt) in PER_MINUTE.items():
        frame = read_trace_frame(traces / rel, format=fmt, step="1min")
        print(f"{name}: {describe_edge_windows(edge_windows(frame)) or 'no partial window'}")
        counts = pd.DataFrame(
            {
                "requests": np.rint(frame["requests_per_s"] * 60).astype(int),
                "prompt_tokens": np.rint(frame["prompt_tokens_per_s"] * 60).astype(int),
                "output_tokens": np.rint(frame["output_tokens_per_s"] * 60).astype(int),
            },
            index=frame.index.strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
        counts.index.name = "time"
        counts.to_csv(out / f"{name}.csv")


def write_per_10min(traces: Path, out: Path) -> None:
    """Total requests over customers per 10-minute window (ServeGen's rates are whole counts
    divided by 600 s, so the counts are exact); gap windows are empty cells."""
    for name, rel in PER_10MIN.items():
        windows = read_servegen(traces / rel)
        total = servegen_total_rate(windows) * windows.window_s
        counts = np.rint(total.to_numpy())
        if np.nanmax(np.abs(counts - total.to_numpy())) > 1e-6:
            raise SystemExit(f"{rel}: rates are not whole counts per window; refusing to round")
        frame = pd.DataFrame(
            {"requests": pd.array(counts, dtype="Int64")},
            index=total.index.strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
        frame.index.name = "time"
        frame.to_csv(out / f"{name}.csv", na_rep="")


def write_slices(traces: Path, out: Path) -> None:
    """Raw-format slices for reader tests: the first rows of Azure conv and Mooncake, and one
    day of a few ServeGen m-mid customers (the day holding the longest all-zero stretch)."""
    slices = out / "slices"
    if slices.exists():
        shutil.rmtree(slices)
    slices.mkdir(parents=True)

    src = traces / PER_MINUTE["azure-conv"][0]
    with src.open() as fh:
        lines = [next(fh) for _ in range(AZURE_SLICE_ROWS + 1)]
    (slices / "azure-conv-head.csv").write_text("".join(lines))

    src = traces / PER_MINUTE["mooncake-conv"][0]
    with src.open() as fh:
        rows = [json.loads(next(fh)) for _ in range(MOONCAKE_SLICE_ROWS)]
    (slices / "mooncake-conv-head.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    folder = traces / PER_10MIN[f"servegen-{SERVEGEN_SLICE_MODEL}"]
    windows = read_servegen(folder)
    total = servegen_total_rate(windows)
    gap_days = total.isna().to_numpy().reshape(-1, WINDOWS_PER_DAY).sum(axis=1)
    day = int(np.argmax(gap_days))
    lo, hi = day * WINDOWS_PER_DAY, (day + 1) * WINDOWS_PER_DAY
    load = windows.rate[:, lo:hi].sum(axis=1)
    order = np.argsort(-load, kind="stable")
    # the largest customer plus the next ones by load, so the slice is varied but small
    picked = sorted(int(windows.customers[i]) for i in order[:SERVEGEN_SLICE_CUSTOMERS])
    dest = slices / f"servegen-{SERVEGEN_SLICE_MODEL}-day{day}"
    dest.mkdir()
    for cid in picked:
        lines = (folder / f"chunk-{cid}-trace.csv").read_text().splitlines(keepends=True)
        (dest / f"chunk-{cid}-trace.csv").write_text("".join(lines[lo:hi]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", type=Path, default=Path("/work/shared/traces"))
    parser.add_argument("--out", type=Path, default=ROOT / "autoscaler" / "data")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    write_per_minute(args.traces, args.out)
    write_per_10min(args.traces, args.out)
    write_slices(args.traces, args.out)
    for f in sorted(args.out.rglob("*")):
        if f.is_file():
            print(f"{f.relative_to(args.out)}\t{f.stat().st_size} bytes")


if __name__ == "__main__":
    main()

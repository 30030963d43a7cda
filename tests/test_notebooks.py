"""The capacity-planning notebooks: committed without outputs, in sync with their generator, and
executed end to end (nbclient, a kernel running this venv's Python) with figures written.
Notebook 1 also runs against a real Prometheus holding a backfilled bundled trace."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
KERNEL = "autoscaler-venv"
EXPECTED_FIGURES = {
    "01-history-and-forecasting.ipynb": {"01-history", "01-backtest-by-horizon",
                                         "01-backtest-bands", "01-forecast-bands"},
    "02-policies-and-start-paths.ipynb": {"02-demand-vs-capacity", "02-gpu-hours-vs-slo",
                                          "02-start-path-savings"},
    "03-what-if.ipynb": {"03-staging-budget", "03-lead-time", "03-gpu-budget"},
}  # fmt: skip


def test_there_are_three_notebooks():
    assert [p.name for p in NOTEBOOKS] == sorted(EXPECTED_FIGURES)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebooks_have_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name}: a cell has outputs (strip them)"
            assert cell.execution_count is None, f"{path.name}: a cell has an execution count"


def test_notebooks_match_their_generator(tmp_path):
    sys.path.insert(0, str(REPO / "notebooks"))
    try:
        import build_notebooks
    finally:
        sys.path.pop(0)
    for written in build_notebooks.build(tmp_path):
        committed = REPO / "notebooks" / written.name
        assert json.loads(written.read_text()) == json.loads(committed.read_text()), (
            f"{written.name} differs from notebooks/build_notebooks.py: re-run it"
        )


@pytest.fixture(scope="module")
def venv_kernel(tmp_path_factory) -> Path:
    """A kernelspec that runs exactly this interpreter (the project's venv)."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "autoscaler venv", "language": "python",
    }))  # fmt: skip
    return root


def execute(path: Path, venv_kernel: Path, monkeypatch, fig_dir: Path, **env: str):
    monkeypatch.setenv("JUPYTER_PATH", str(venv_kernel))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("AUTOSCALER_FIG_DIR", str(fig_dir))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    fig_dir.mkdir(parents=True, exist_ok=True)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=300,
                            resources={"metadata": {"path": str(fig_dir)}})  # fmt: skip
    client.execute()  # raises CellExecutionError on any failing cell
    return nb


def _text(nb) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            out.append(o.get("text", "") or json.dumps(o.get("data", {}).get("text/plain", "")))
    return "\n".join(out)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_without_errors_and_writes_its_figures(path, venv_kernel, monkeypatch,
                                                            tmp_path):  # fmt: skip
    nb = execute(path, venv_kernel, monkeypatch, tmp_path)
    written = {p.stem for p in tmp_path.glob("*.png") if p.stat().st_size > 1000}
    assert written == EXPECTED_FIGURES[path.name]
    text = _text(nb)
    assert "servegen-m-mid (bundled public trace)" in text
    # the kernel ran this venv's interpreter (the project importable, the same pandas)
    assert "Traceback" not in text


@pytest.mark.slow
@pytest.mark.integration
def test_history_notebook_reads_demand_from_a_real_prometheus(prometheus, venv_kernel,
                                                              monkeypatch, tmp_path):  # fmt: skip
    from autoscaler.signals.backfill import backfill

    result = backfill("bundled:servegen-m-mid", tmp_path / "bf", step="10min", workload="llm")
    server = prometheus(result.tsdb_dir)
    figs = tmp_path / "figs"
    span = result.end - result.start
    nb = execute(
        REPO / "notebooks" / "01-history-and-forecasting.ipynb", venv_kernel, monkeypatch, figs,
        AUTOSCALER_PROMETHEUS_URL=server.url, AUTOSCALER_WORKLOAD="llm",
        AUTOSCALER_HISTORY=str(span + pd.Timedelta("4h")), AUTOSCALER_STEP="10min",
    )  # fmt: skip
    text = _text(nb)
    assert f"llm from {server.url}" in text
    assert "best by pinball@0.9" in text
    assert {p.stem for p in figs.glob("*.png")} == EXPECTED_FIGURES[
        "01-history-and-forecasting.ipynb"
    ]

"""Saved forecasters in the control loops: which workload starts from which model folder, the
start-up checks, and what each fit reports (saved model or fresh fit, and why).

The controller and the KEDA standalone loop both fit through `FitCache`; for a workload with
`forecast.model_dir` a fit is `autoscaler.model_store.load_or_fit` (the saved model when it
loads cleanly, else a fresh fit and the reason). Checked at start, naming the field:
- the folder exists (a misspelt path stops the loop, it never runs on a guess);
- a readable card's step equals the loop's `forecast_step` (a model is never fed history on
  another grid; the loop refuses to start rather than silently fit something else).
A card that cannot be read, a corrupted model file or other library versions are not start
errors: they are reported when the model is loaded, and a fresh model is fitted instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from autoscaler.config import ControllerConfig
from autoscaler.errors import ConfigError

log = logging.getLogger("autoscaler.controller")

SOURCE_SAVED = "saved"
SOURCE_FRESH = "fresh"


@dataclass(frozen=True)
class ModelSource:
    """Where a workload's current forecaster came from: `saved` (loaded from `path`, with its
    card's model name and sha256) or `fresh` (fitted on live history; `error` says why the
    saved model was not used, None when none was configured)."""

    source: str
    message: str
    path: str | None = None
    model: str | None = None
    sha256: str | None = None
    error: str | None = None
    error_type: str | None = None

    @property
    def fell_back(self) -> bool:
        """A saved model was configured but not used."""
        return self.source == SOURCE_FRESH and self.error is not None

    def short(self) -> str:
        """One phrase for a decision summary."""
        if self.source == SOURCE_SAVED:
            return f"saved model {self.model} sha256 {(self.sha256 or '')[:12]}"
        if self.error:
            return f"fresh model, saved one refused: {self.error}"
        return "fresh model"


def model_dirs(config: ControllerConfig) -> dict[str, str]:
    """{workload name: model folder} for the workloads that name one."""
    return {w.name: w.forecast.model_dir for w in config.workloads if w.forecast.model_dir}


def check_saved_models(config: ControllerConfig) -> None:
    """Start-up checks of every `workloads[i].forecast.model_dir`; raises ConfigError naming the
    field. See the module docstring for what is checked here and what at load."""
    from autoscaler.model_store import ModelLoadError, read_card

    step = pd.Timedelta(config.forecast_step)
    for i, w in enumerate(config.workloads):
        folder = w.forecast.model_dir
        if not folder:
            continue
        field_path = f"workloads[{i}].forecast.model_dir"
        path = Path(folder)
        if not path.is_dir():
            what = "is not a folder" if path.exists() else "does not exist"
            raise ConfigError(field_path, f"{folder!r} {what} (workload {w.name!r})")
        try:
            card = read_card(path)
        except ModelLoadError as exc:  # reported again at load, with the fresh fit
            log.warning("%s: the saved model of %s will not load: %s", field_path, w.name, exc)
            continue
        trained = pd.Timedelta(card.training.step)
        if trained != step:
            raise ConfigError(
                field_path,
                f"the model in {folder!r} was trained at a step of {trained}, the loop "
                f"forecasts at forecast_step {step}: retrain it with `autoscaler train "
                f"--step {config.forecast_step}` or set forecast_step to {trained}",
            )


def source_of(reason: object | None) -> ModelSource:
    """A ModelSource from `load_or_fit`'s LoadReason (None: no model folder configured)."""
    if reason is None:
        return ModelSource(SOURCE_FRESH, "fitted on live history (no saved model configured)")
    loaded = bool(getattr(reason, "loaded", False))
    card = getattr(reason, "card", None)
    error = getattr(reason, "error", None)
    return ModelSource(
        source=SOURCE_SAVED if loaded else SOURCE_FRESH,
        message=str(reason),
        path=getattr(reason, "path", None),
        model=card.model if card is not None else None,
        sha256=card.sha256 if card is not None else None,
        error=str(error) if error is not None else None,
        error_type=type(error).__name__ if error is not None else None,
    )

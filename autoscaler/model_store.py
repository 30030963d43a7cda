"""Saved forecasters: a model file plus a model card, loaded only when both still agree.

A saved model is a folder:
- `model.joblib`: the fitted `Forecaster` (joblib pickle, compressed);
- `model-card.json`: what it is (forecaster, step, quantiles), what it was trained on (source,
  period, points), how it scored in a rolling backtest against the anchors, the library
  versions it was pickled with, and the sha256 of `model.joblib`;
- `MODEL_CARD.md`: the same for people.

Why the checks: a pickle written by another scikit-learn, statsmodels, pandas or numpy can load
"fine" and then predict nonsense or fail deep inside a control cycle; a truncated file fails in
obscure ways. `load_model` therefore verifies the sha256 and the versions *before* unpickling,
and every failure is a typed `ModelLoadError` that names the file and what is wrong.
`load_or_fit` is what the controller and the KEDA scaler call: it falls back to a freshly fitted
forecaster on any load failure and says so in its `LoadReason` (never silently).

Unpickling runs code: load models only from paths you trust (the image, a ConfigMap, a volume
the platform team controls). The sha256 guards against corruption, not against an attacker who
can also rewrite the card.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from autoscaler.errors import AutoscalerError
from autoscaler.forecast.base import DEFAULT_QUANTILES, Forecaster

log = logging.getLogger(__name__)

MODEL_FILE = "model.joblib"
CARD_FILE = "model-card.json"
CARD_MARKDOWN = "MODEL_CARD.md"
CARD_FORMAT = 1

#: Distributions whose version is recorded; those in CHECKED_LIBRARIES must match on load
#: (major.minor: their pickles are not promised to survive a minor release).
RECORDED_LIBRARIES = ("autoscaler", "scikit-learn", "statsmodels", "pandas", "numpy", "scipy",
                      "joblib")  # fmt: skip
CHECKED_LIBRARIES = ("autoscaler", "scikit-learn", "statsmodels", "pandas", "numpy")


class ModelLoadError(AutoscalerError):
    """A saved model cannot be used; `path` names the file, the message says why."""

    def __init__(self, path: str | Path, message: str) -> None:
        self.path = str(path)
        super().__init__(f"{path}: {message}")


class ModelCardError(ModelLoadError):
    """The model card is missing, not JSON, or lacks a field."""


class ModelIntegrityError(ModelLoadError):
    """The model file is missing, does not match the card's sha256, or does not unpickle."""


class ModelVersionMismatch(ModelLoadError):
    """The model was saved with other library versions than the running ones."""

    def __init__(self, path: str | Path, mismatches: Mapping[str, tuple[str, str]]) -> None:
        self.mismatches = dict(mismatches)
        listed = ", ".join(f"{lib} saved {saved}, running {now}"
                           for lib, (saved, now) in sorted(self.mismatches.items()))  # fmt: skip
        super().__init__(path, f"library versions differ ({listed}); retrain with "
                               "`autoscaler train` under the running versions")  # fmt: skip


class ModelMismatch(ModelLoadError):
    """The model is intact but does not fit the series it is asked to forecast (its step)."""


@dataclass(frozen=True)
class TrainingData:
    """What a model was fitted on."""

    source: str  # e.g. "bundled:servegen-m-mid", "trace:/path/file.csv", "prometheus:URL"
    start: str  # ISO 8601, UTC
    end: str
    step: str  # pandas Timedelta string, e.g. "0 days 00:10:00"
    points: int
    observed_points: int  # non-gap points
    attribution: str = ""

    @classmethod
    def of(cls, series: pd.Series, source: str, attribution: str = "") -> TrainingData:
        step = series.index.freq or (series.index[1] - series.index[0])
        return cls(
            source=source,
            start=series.index[0].isoformat(),
            end=series.index[-1].isoformat(),
            step=str(pd.Timedelta(step)),
            points=len(series),
            observed_points=int(series.notna().sum()),
            attribution=attribution,
        )


@dataclass(frozen=True)
class ModelCard:
    """Everything needed to trust (or refuse) a saved model, and to explain it to a person."""

    model: str  # the forecaster's name ("auto", "gbm", "holt-winters", ...)
    forecaster_class: str  # module.QualName of the pickled object
    quantiles: tuple[float, ...]
    training: TrainingData
    backtest: dict[str, Any]  # scores per model (anchors included) and how they were measured
    versions: dict[str, str]
    sha256: str
    size_bytes: int
    created: str
    card_format: int = CARD_FORMAT
    notes: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True, default=str) + "\n"

    @classmethod
    def from_json(cls, text: str, path: str | Path) -> ModelCard:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelCardError(path, f"not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ModelCardError(path, "a model card is a JSON object")
        if data.get("card_format") != CARD_FORMAT:
            raise ModelCardError(
                path, f"card format {data.get('card_format')!r}, this version reads {CARD_FORMAT}"
            )
        try:
            training = TrainingData(**data.pop("training"))
            data["quantiles"] = tuple(float(q) for q in data["quantiles"])
            return cls(training=training, **data)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelCardError(path, f"missing or unexpected field: {exc}") from exc


def running_versions() -> dict[str, str]:
    """Versions of Python and the recorded libraries in this process."""
    versions = {"python": platform.python_version()}
    for dist in RECORDED_LIBRARIES:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def _major_minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def version_mismatches(saved: Mapping[str, str],
                       running: Mapping[str, str] | None = None) -> dict[str, tuple[str, str]]:
    """Libraries (and Python) whose major.minor differs between `saved` and `running`."""
    running = running or running_versions()
    out = {}
    for lib in ("python", *CHECKED_LIBRARIES):
        was, now = saved.get(lib, "unknown"), running.get(lib, "unknown")
        if _major_minor(was) != _major_minor(now):
            out[lib] = (was, now)
    return out


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder and rename: a crash never leaves a
    half-written model next to a card that describes a whole one (also backfill's ledger)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        # mkstemp makes 0600; a model is read by the (non-root) controller user of the image.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(
    model: Forecaster,
    folder: str | Path,
    training: TrainingData,
    backtest: Mapping[str, Any] | None = None,
    model_name: str | None = None,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
    notes: str = "",
    parameters: Mapping[str, Any] | None = None,
) -> ModelCard:
    """Save a fitted forecaster and its card into `folder` (created if needed); returns the card.
    The model file is written first and the card last, each atomically, so a card on disk
    always describes a complete model file."""
    import joblib

    if not isinstance(model, Forecaster):
        raise TypeError(f"expected a Forecaster, got {type(model).__name__}")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / MODEL_FILE
    atomic_write(model_path, lambda p: joblib.dump(model, p, compress=("xz", 6)))
    card = ModelCard(
        model=model_name or getattr(model, "name", type(model).__name__),
        forecaster_class=f"{type(model).__module__}.{type(model).__qualname__}",
        quantiles=tuple(float(q) for q in quantiles),
        training=training,
        backtest=dict(backtest or {}),
        versions=running_versions(),
        sha256=file_sha256(model_path),
        size_bytes=model_path.stat().st_size,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        notes=notes,
        parameters=dict(parameters or {}),
    )
    atomic_write(out / CARD_FILE, lambda p: p.write_text(card.to_json()))
    atomic_write(out / CARD_MARKDOWN, lambda p: p.write_text(card_markdown(card)))
    return card


def read_card(folder: str | Path) -> ModelCard:
    """The model card of a saved model (no check of the model file)."""
    path = Path(folder) / CARD_FILE
    try:
        text = path.read_text()
    except OSError as exc:
        raise ModelCardError(path, f"cannot read the model card: {exc.strerror or exc}") from exc
    return ModelCard.from_json(text, path)


def load_model(
    folder: str | Path, check_versions: bool = True
) -> tuple[Forecaster, ModelCard]:
    """Load a saved forecaster after checking its card, its sha256 and the library versions.

    Raises ModelCardError, ModelIntegrityError or ModelVersionMismatch (all ModelLoadError)."""
    import joblib

    folder = Path(folder)
    card = read_card(folder)
    model_path = folder / MODEL_FILE
    if not model_path.is_file():
        raise ModelIntegrityError(model_path, "model file missing")
    digest = file_sha256(model_path)
    if digest != card.sha256:
        raise ModelIntegrityError(
            model_path,
            f"sha256 {digest[:16]}... does not match the card's {card.sha256[:16]}... "
            "(corrupted or replaced file)",
        )
    if check_versions:
        mismatches = version_mismatches(card.versions)
        if mismatches:
            raise ModelVersionMismatch(model_path, mismatches)
    try:
        model = joblib.load(model_path)
    except Exception as exc:  # an unpicklable file can raise nearly anything
        raise ModelIntegrityError(model_path, f"cannot unpickle: {exc!r}") from exc
    if not isinstance(model, Forecaster):
        raise ModelIntegrityError(model_path, f"holds a {type(model).__name__}, not a Forecaster")
    return model, card


@dataclass(frozen=True)
class LoadReason:
    """Why `load_or_fit` returned the model it did: loaded from `path`, or fitted afresh because
    of `error` (kept, so callers can export it as a metric or an event)."""

    loaded: bool
    message: str
    path: str
    error: ModelLoadError | None = None
    card: ModelCard | None = None

    def __str__(self) -> str:
        return self.message


def load_or_fit(
    path: str | Path | None,
    history: pd.Series,
    fresh: Callable[[], Forecaster],
    check_versions: bool = True,
) -> tuple[Forecaster, LoadReason]:
    """The saved model at `path` when it loads cleanly and was trained at the history's step;
    otherwise `fresh()` fitted on `history`, with the reason. Never silent: a fallback is
    logged as a warning and its `LoadReason` carries the typed error.

    A loaded model is returned as saved (fitted on its training data); forecast live data with
    `model.predict_from(history, ...)`. Errors of the fresh fit itself (e.g. InsufficientData)
    propagate: there is nothing left to fall back to.
    """
    where = str(path) if path is not None else "<no model path>"
    error: ModelLoadError | None = None
    if path is not None:
        try:
            model, card = load_model(path, check_versions=check_versions)
            step = _series_step(history)
            if step is not None and pd.Timedelta(card.training.step) != step:
                raise ModelMismatch(
                    Path(path) / MODEL_FILE,
                    f"trained at a step of {card.training.step}, the history's step is {step}",
                )
            message = (f"loaded {card.model} from {where} (sha256 and versions checked; "
                       f"trained on {card.training.source})")  # fmt: skip
            return model, LoadReason(True, message, where, card=card)
        except ModelLoadError as exc:
            error = exc
    try:
        model = fresh().fit(history)
    except Exception as exc:
        if error is not None:  # keep why the saved model was not used with the fit's failure
            log.warning("model fallback: %s; the fresh fit failed too: %s", error, exc)
            exc.add_note(f"saved model not used: {error}")
        raise
    cause = str(error) if error else "no saved model configured"
    message = f"fitted a fresh {getattr(model, 'name', type(model).__name__)} forecaster: {cause}"
    if error is not None:
        log.warning("model fallback: %s", message)
    return model, LoadReason(False, message, where, error=error)


def _series_step(series: pd.Series) -> pd.Timedelta | None:
    if not isinstance(series.index, pd.DatetimeIndex):
        return None
    if series.index.freq is not None:
        return pd.Timedelta(series.index.freq)
    if len(series.index) >= 2:
        return pd.Timedelta(series.index[1] - series.index[0])
    return None


def card_markdown(card: ModelCard) -> str:
    """A short human-readable model card."""
    t = card.training
    lines = [
        f"# Model card: {card.model}",
        "",
        f"- forecaster: `{card.forecaster_class}`, quantiles {list(card.quantiles)}",
        f"- created: {card.created}",
        f"- model file: `{MODEL_FILE}`, {card.size_bytes:,} bytes, sha256 `{card.sha256}`",
        "",
        "## Training data",
        "",
        f"- source: {t.source}",
        f"- period: {t.start} to {t.end} (step {pd.Timedelta(t.step)}), "
        f"{t.points} points of which {t.observed_points} observed (the rest are gaps)",
    ]
    if t.attribution:
        lines.append(f"- attribution: {t.attribution}")
    if card.backtest:
        lines += ["", "## Rolling backtest (no fold sees data after its origin)", ""]
        setup = {k: v for k, v in card.backtest.items() if k != "scores"}
        for key, value in setup.items():
            lines.append(f"- {key}: {value}")
        scores = card.backtest.get("scores", {})
        if scores:
            metrics = sorted({m for s in scores.values() for m in s})
            lines += ["", "| model | " + " | ".join(metrics) + " |",
                      "|---|" + "---|" * len(metrics)]  # fmt: skip
            for name, s in scores.items():
                cells = [_fmt(s.get(m)) for m in metrics]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Versions (checked on load: python and "
              + ", ".join(CHECKED_LIBRARIES) + ", major.minor)", ""]  # fmt: skip
    lines += [f"- {lib}: {v}" for lib, v in sorted(card.versions.items())]
    if card.notes:
        lines += ["", "## Notes", "", card.notes]
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)

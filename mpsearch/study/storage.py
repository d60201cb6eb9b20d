"""Where a study is recorded (an Optuna storage) and whether a run may resume it.

Every evaluation is one trial of one Optuna study, recorded with the config the study ran with,
its resolved search space and its baseline's sha256. A run on an existing study resumes it only
when nothing that decides what a trial measures has changed; everything that could refuse a
resume is checked before anything is written, so a refused run leaves the study as it was.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mpsearch.config import RESUMABLE_FIELDS, StudyConfig
from mpsearch.errors import UserError
from mpsearch.objectives import objective_spec, objective_vector

if TYPE_CHECKING:
    import optuna

__all__ = ["JOURNAL", "storage_url", "open_storage", "shown_url", "existing_study", "create_study", "record_settings",
           "records_by_slot", "load_trials", "told_objectives"]


JOURNAL = "journal:"  # run.storage prefix of an Optuna journal file


def storage_url(config: StudyConfig) -> str | None:
    """``run.storage`` (a journal file's path made absolute), else SQLite in ``run.out_dir``;
    None (in memory) when the study writes nothing."""
    storage = config.run.storage
    if storage and storage.startswith(JOURNAL):
        path = storage[len(JOURNAL):]
        if not path:
            raise UserError("run.storage: journal: needs a file path, e.g. journal:studies/NAME/journal.log",
                            fields=("run.storage",))
        return JOURNAL + str(Path(path).expanduser().resolve())
    if storage:
        return storage
    if config.run.out_dir:
        return f"sqlite:///{(Path(config.run.out_dir) / 'study.db').resolve()}"
    return None


def open_storage(url: str | None) -> Any:
    """What Optuna takes for ``url``: a fresh in-memory storage (None), a journal storage
    (``journal:PATH``; a single file, safe for several processes, on NFS too), else the URL."""
    import optuna

    if url is None:
        return optuna.storages.InMemoryStorage()
    if url.startswith(JOURNAL):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url[len(JOURNAL):])
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    return url


def shown_url(url: str | None) -> str:
    """``url`` with any password replaced by ``***`` (for logs, errors and reports)."""
    if not url or "@" not in url or "://" not in url:
        return str(url)
    scheme, rest = url.split("://", 1)
    credentials, at, host = rest.rpartition("@")
    user, colon, _ = credentials.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}{at}{host}"


def _storage_error(url: str, exc: Exception) -> UserError:
    if isinstance(exc, ModuleNotFoundError):  # psycopg2 / pymysql: the database driver
        return UserError(f"cannot open study storage {shown_url(url)!r}: {exc} (its database driver); for PostgreSQL "
                         "pip install 'mpsearch[cluster]'", fields=("run.storage",))
    return UserError(f"cannot open study storage {shown_url(url)!r} ({type(exc).__name__}); give run.storage a valid Optuna "
                     "storage URL or journal:PATH", fields=("run.storage",))


def existing_study(config: StudyConfig, space: dict[str, Any], url: str | None) -> tuple[Any, int]:
    """The study to resume and how many trials it holds, or ``(None, 0)`` for a new one. A study
    without trials counts as new; ``space`` is the search space's resolved form."""
    import optuna

    if url is None:
        return None, 0
    name = config.study_name
    try:
        study = optuna.load_study(study_name=name, storage=open_storage(url))
    except KeyError:  # no such study in this storage
        return None, 0
    except Exception as exc:  # noqa: BLE001 - bad URLs raise many types (ArgumentError, ImportError, OperationalError)
        raise _storage_error(url, exc) from None
    recorded = len(study.trials)
    directions = [objective_spec(o)[0] for o in config.search.objectives]
    if not recorded:
        if [d.name.lower() for d in study.directions] != directions:
            raise UserError(f"study {name!r} exists in {shown_url(url)} with other objectives; choose another study name")
        return study, 0
    stored = study.user_attrs.get("config")
    try:
        stored_config = StudyConfig.from_dict(stored) if isinstance(stored, dict) else None
        if stored_config is not None and "max_drop" not in stored.get("search", {}):
            # made before studies had an accuracy floor: it searched without one
            stored_config = replace(stored_config, search=replace(stored_config.search, max_drop=None))
    except UserError:
        stored_config = None
    if stored_config is None:
        raise UserError(f"study {name!r} in {shown_url(url)} holds {recorded} trials that this mpsearch did not make (no readable config); "
                        "choose another study name")
    conflict = config.conflict_with(stored_config)
    if conflict is None and study.user_attrs.get("space", space) != space:
        conflict = "search.space", f"the search space file {config.search.space or 'default'} changed"
    if conflict:
        changeable = ", ".join(RESUMABLE_FIELDS)
        raise UserError(f"study {name!r} exists with other settings ({conflict[1]}); rerun with the study's settings to resume it "
                        f"(only {changeable} may change), or start another study under another name", fields=(conflict[0],))
    used: dict[str, float] = {}  # full-evaluation equivalents per method
    for t in study.trials:
        run = str(t.user_attrs.get("run", config.search.algorithm))
        used[run] = used.get(run, 0.0) + float(t.user_attrs.get("fidelity", 1.0))
    most = max(used.values(), default=0.0)
    if config.search.budget < most - 1e-9:
        raise UserError(f"study {name!r} already used {most:g} evaluations; search.budget {int(np.ceil(most - 1e-9))} "
                        "or more resumes it", fields=("search.budget",))
    return study, recorded


def create_study(config: StudyConfig, url: str | None) -> Any:
    import optuna

    directions = [objective_spec(o)[0] for o in config.search.objectives]
    try:
        return optuna.create_study(study_name=config.study_name, storage=open_storage(url), directions=directions,
                                   load_if_exists=True)
    except Exception as exc:  # noqa: BLE001 - bad URLs raise many types (ArgumentError, ImportError, OperationalError)
        raise _storage_error(str(url), exc) from None


def record_settings(study: optuna.Study, config: StudyConfig, space: dict[str, Any], baseline_sha256: str | None) -> None:
    """What a resume is checked against: the config, the resolved search space, the baseline's sha256."""
    import optuna

    with warnings.catch_warnings():  # experimental since optuna 3.2, stable in practice
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(config.search.objectives))
    study.set_user_attr("config", config.to_dict())
    study.set_user_attr("space", space)
    study.set_user_attr("baseline_sha256", baseline_sha256)


def records_by_slot(study: optuna.Study) -> dict[tuple[str, int, int], Any]:
    """The study's finished search trials keyed by (method, generation, slot in the generation's batch)."""
    from optuna.trial import TrialState

    out: dict[tuple[str, int, int], Any] = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
        attrs = trial.user_attrs
        out.setdefault((str(attrs["run"]), int(attrs["generation"]), int(attrs["slot"])), trial)
    return out


def told_objectives(trial: Any, objectives: tuple[str, ...]) -> np.ndarray:
    """What the algorithm was told for a recorded trial (the same floats: values are stored exactly)."""
    if trial.state.name != "COMPLETE":
        return objective_vector(None, objectives)
    return objective_vector({objective_spec(o)[1]: v for o, v in zip(objectives, trial.values)}, objectives)


def load_trials(study: optuna.Study) -> Any:
    """The study's trials as a DataFrame: number, state, params, values, every user attribute."""
    import pandas as pd

    rows = []
    for t in study.trials:
        row: dict[str, Any] = {"trial": t.number, "state": t.state.name}
        for name, value in zip(study.metric_names or [], t.values or []):
            row[f"value_{name}"] = value
        row.update({f"attr_{k}": v for k, v in t.user_attrs.items()})
        row.update({f"param_{k}": v for k, v in t.params.items()})
        rows.append(row)
    return pd.DataFrame(rows)

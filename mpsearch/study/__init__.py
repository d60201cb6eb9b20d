"""Search studies: one Optuna study per search, run by :func:`run_study`, read back by :func:`load_result`.

- :mod:`~mpsearch.study.driver`: the run (what is measured, seeds, methods, the final front);
- :mod:`~mpsearch.study.loop`: one method's ask/measure/record/tell loop;
- :mod:`~mpsearch.study.storage`: the Optuna storage and the resume checks;
- :mod:`~mpsearch.study.checkpoint`: the search-state digests a resume replays against;
- :mod:`~mpsearch.study.seeding`: where searches start (uniform policies, ILP solutions);
- :mod:`~mpsearch.study.front`: re-measuring (and fine-tuning) the Pareto set;
- :mod:`~mpsearch.study.result`: :class:`SearchResult` and picks;
- :mod:`~mpsearch.study.outputs`: the study's files.
"""

from mpsearch.study.checkpoint import CHECKPOINT_FILE
from mpsearch.study.driver import Subject, run_study
from mpsearch.study.result import KNEE_WINDOW_PP, PARETO_FILE, STUDY_FILE, SearchResult, knee_index, load_result
from mpsearch.study.storage import load_trials, storage_url

__all__ = ["run_study", "Subject", "SearchResult", "load_result", "load_trials", "storage_url", "knee_index",
           "CHECKPOINT_FILE", "PARETO_FILE", "STUDY_FILE", "KNEE_WINDOW_PP"]

"""Clean a dataset after the first model: rank images by loss, likely label errors and duplicates.

One batched pass of the model gives every image's probabilities, loss and pooled body embedding
(``scores``). From those: top losses; likely label errors by confident learning (cleanlab) on
out-of-fold probabilities of a logistic regression on the embeddings; near-duplicates by cosine
similarity and exact duplicates by sha256 (``ranking``). A small local web app (``app``) shows
them and records the user's decisions (``decisions``): appended to ``DATA/clean_log.csv`` (the
source of truth, replayed on start, last decision wins) and mirrored in ``DATA/cleaned.csv``
(fastai's ``name,label``). No image is ever moved, rewritten or deleted; on start, ``sweep``
removes the temp files an interrupted save left (ursa's own temp names only).

The names load lazily (``__getattr__``, as ``ursa.inference`` does): ``import ursa.apps.clean`` or
``from ursa.apps.clean.decisions import CLEAN_LOCK`` costs no torch; ``prepare`` and the app do.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {  # name -> the module of this package that holds it
    "create_app": "app", "serve": "app",
    "CLEAN_LOCK": "decisions", "CLEANED_NAME": "decisions", "LOCK_WHAT": "decisions", "LOG_NAME": "decisions",
    "Decisions": "decisions", "check_writable": "decisions",
    "DUP_THRESHOLD": "ranking", "Pair": "ranking", "Rankings": "ranking", "export_rankings": "ranking", "rank": "ranking",
    "summary_line": "ranking",
    "Scores": "scores", "score_dataset": "scores",
    "CleanSession": "session", "prepare": "session", "start_session": "session",
    "sweep_temp_files": "sweep",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:  # a submodule (clean.scores) as the eager package gave it, or no such name
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value  # once: later lookups (and monkeypatch.setattr) see a plain module attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))

"""Clean a dataset after the first model: rank images by loss, likely label errors and duplicates.

One batched pass of the model gives every image's probabilities, loss and pooled body embedding
(``scores``). From those: top losses; likely label errors by confident learning (cleanlab) on
out-of-fold probabilities of a logistic regression on the embeddings; near-duplicates by cosine
similarity and exact duplicates by sha256 (``ranking``). A small local web app (``app``) shows
them and records the user's decisions (``decisions``): appended to ``DATA/clean_log.csv`` (the
source of truth, replayed on start, last decision wins) and mirrored in ``DATA/cleaned.csv``
(fastai's ``name,label``). No image is ever moved, rewritten or deleted; on start, ``sweep``
removes the temp files an interrupted save left (ursa's own temp names only).
"""

from ursa.apps.clean.app import create_app, serve
from ursa.apps.clean.decisions import CLEAN_LOCK, CLEANED_NAME, LOCK_WHAT, LOG_NAME, Decisions, check_writable
from ursa.apps.clean.ranking import DUP_THRESHOLD, Pair, Rankings, export_rankings, rank, summary_line
from ursa.apps.clean.scores import Scores, score_dataset
from ursa.apps.clean.session import CleanSession, prepare, start_session
from ursa.apps.clean.sweep import sweep_temp_files

__all__ = [
    "CLEAN_LOCK", "CLEANED_NAME", "LOCK_WHAT", "DUP_THRESHOLD", "LOG_NAME", "CleanSession", "Decisions", "Pair", "Rankings", "Scores",
    "check_writable", "create_app", "export_rankings", "prepare", "rank", "score_dataset", "serve",
    "start_session", "summary_line", "sweep_temp_files",
]

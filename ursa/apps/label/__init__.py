"""Label the pictures ``ursa suggest`` ranked first: a local page that files them into their class folders.

``filing``: the append-only ``POOL/label_log.csv`` and the move that never overwrites (replayed on
start, so a kill -9 loses and duplicates nothing); ``app``: the Starlette page over a
``LabelSession`` (the cleaner's host guard, body limits, image route and server).
"""

from ursa.apps.label.app import LabelSession, create_app, serve
from ursa.apps.label.filing import LABEL_LOCK, LOCK_WHAT, LOG_NAME, Filing

__all__ = ["LABEL_LOCK", "LOCK_WHAT", "LOG_NAME", "Filing", "LabelSession", "create_app", "serve"]

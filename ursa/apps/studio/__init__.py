"""`ursa studio`: one local page from an empty folder to a served model, reusing every stage.

``project`` (class folders, atomic image writes, quarantine, near-duplicates), ``thumbs`` (cached
thumbnails, made only when shown), ``jobs`` (`ursa train`, `export --int8`, `download`, `show` in a child
process), ``review`` (the run's report, the cleaner's session, live prediction through the ONNX
model serve loads), ``workspace`` (what one studio owns), ``app`` (routes, lifespan, server).
"""

from ursa.apps.studio.app import create_app, serve
from ursa.apps.studio.project import Project, ProjectError, not_a_project
from ursa.apps.studio.workspace import Studio, default_runs

__all__ = ["Project", "ProjectError", "Studio", "create_app", "default_runs", "not_a_project", "serve"]

"""`ursa serve`: the model behind a small, bounded web API and a page to try it (docs/serve.md).

``config`` (ServeConfig and its trip through the environment), ``body`` (reading and checking
request bodies), ``limits`` (decoded pixels per image and request, one request's share of the
decode pool), ``batching`` (decode pool, inference thread, micro-batches), ``model`` (which
predictor runs: the torch-free ONNX runtime, or torch, imported only then), ``app`` (the routes
and ``create_app``), ``runner`` (uvicorn with its limits, one process or several workers).
"""

from ursa.apps.serve.app import app_from_env, create_app
from ursa.apps.serve.batching import MicroBatcher
from ursa.apps.serve.config import ServeConfig
from ursa.apps.serve.runner import WORKER_FACTORY, serve

__all__ = ["WORKER_FACTORY", "MicroBatcher", "ServeConfig", "app_from_env", "create_app", "serve"]

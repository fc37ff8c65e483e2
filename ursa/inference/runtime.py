"""The slim runtime: an ursa ONNX file on ONNX Runtime with numpy + Pillow preprocessing, no torch anywhere.

This module and everything it imports (``metaschema``, ``preprocess``, ``results``, ``session``,
``vision.images``) are torch-free, so ``ursa predict model.onnx`` and a server can run in an
environment without torch or timm (``pip install ursa[serve] --no-deps`` style, see
docs/deploy.md). Preprocessing comes from the file's ``preprocess`` metadata (older exports:
rebuilt from input size, mean and std), bit-identical to the training pipeline's evaluation
transform. Calibration is applied as in the torch predictor: logits / temperature, softmax, and
``unsure`` below the threshold. With ``tta=True`` each batch also runs the mirrors the model was
trained with (``tta``: one forward pass of 2N or 3N images) and the calibrated probabilities are
averaged; the body features come from the plain view.

Batches decode in a thread pool while the previous batch runs through the network (Pillow and
numpy release the GIL), and results come back in input order as soon as each batch is done.
"""

from __future__ import annotations

import itertools
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from ursa.errors import ImageError, ModelFileError, UrsaError
from ursa.inference.metaschema import ONNX_META_KEY, ModelMeta, loads
from ursa.inference.openset import OpenWorld
from ursa.inference.placement import CPU, Placement, onnx_device, onnx_line, onnx_refusal
from ursa.inference.preprocess import PREPROCESS_KEY, Preprocess, check_spec, preprocess_spec
from ursa.inference.results import Prediction, check_backend, check_threshold
from ursa.inference.session import check_session_fits, ort_session
from ursa.inference.task import task_named, thresholds_of
from ursa.inference.tta import mean_probs, tta_views, view_batch
from ursa.util.device import cores
from ursa.vision.images import Source


FEATURES_OUTPUT = "features"  # the export's second output: the pooled body features (export.ONNX_FEATURES)
EVIDENCE_OUTPUT = "evidence"  # the third: per-class evidence maps [N, K, h, w] for heat maps (inference.explain)


class NoEvidenceOutput(UrsaError):
    """An ONNX file exported before it carried the evidence maps: no heat maps from it (export it again)."""


class NoFeaturesOutput(UrsaError):
    """An ONNX file exported before it carried the body features: interpret and clean run torch instead."""


def stream_batches(sources: Iterable[Source], bs: int, decode: Callable[[Source], Any],
                   forward: Callable[[list[Any]], list[Any]], workers: int = 0) -> Iterator[tuple[Source, Any]]:
    """(source, forward's answer or the ImageError that made it unreadable) in input order, batch by batch.

    With ``workers`` > 0 decoding runs in a thread pool up to two batches ahead of the network (the
    decode of batch k+1 overlaps the forward pass of batch k); with 0, in this thread. Either way at
    most two batches of decoded images are held, however many sources there are (both backends).
    """
    bs, it = max(1, int(bs)), iter(sources)
    if workers <= 0:
        while batch := [(s, partial(decode, s)) for s in itertools.islice(it, bs)]:
            yield from _answers(batch, forward)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="ursa-decode") as pool:
        pending: deque[tuple[Source, Callable[[], Any]]] = deque()
        while True:
            for s in itertools.islice(it, max(0, 2 * bs - len(pending))):
                pending.append((s, pool.submit(decode, s).result))
            if not pending:
                return
            yield from _answers([pending.popleft() for _ in range(min(bs, len(pending)))], forward)


def _answers(batch: list[tuple[Source, Callable[[], Any]]],
             forward: Callable[[list[Any]], list[Any]]) -> Iterator[tuple[Source, Any]]:
    """One batch: decode (or collect) each item, forward the readable ones together, answer in order."""
    sources = [src for src, _ in batch]
    got = [_decoded(get) for _, get in batch]
    batch.clear()  # the futures hold the decoded pixels too
    errors = [e for _, e in got]
    arrays = [x for x, e in got if e is None]
    del got
    preds = iter(forward(arrays) if arrays else [])
    del arrays  # the decoded pixels go before the answers are handed out
    for src, err in zip(sources, errors):
        yield src, err if err is not None else next(preds)


def _decoded(get: Callable[[], Any]) -> tuple[Any, ImageError | None]:
    """(pixels, None), or (None, the ImageError) for an unreadable image."""
    try:
        return get(), None
    except ImageError as e:
        return None, e.with_traceback(None)  # its frames would keep this batch's pixels alive


class OnnxPredictor:
    """Loaded once, used many times: numpy preprocessing + ONNX Runtime + calibrated softmax."""

    backend = "onnx"

    def __init__(self, session: Any, meta: ModelMeta, spec: dict[str, Any] | None = None,
                 source: Path | None = None, decoders: int | None = None, tta: bool = False,
                 device: str = "cpu", threads: int | None = None) -> None:
        self.session, self.meta, self.source = session, meta, source
        self.device, self.threads = device, threads or cores()  # where the session runs ("cpu", "cuda:N")
        self.views = tta_views(meta.config, tta, source)  # ("original",) unless TTA adds the trained mirrors
        self.spec = spec or preprocess_spec(meta.input_size, meta.mean, meta.std)
        self.preprocess = Preprocess(self.spec)
        cal = meta.calibration or {}
        self.temperature = float(cal.get("temperature") or 1.0)
        self.threshold: float | None = check_threshold(cal.get("threshold"))
        self.classes = list(meta.classes)
        self.task, self.thresholds = task_named(meta.task), thresholds_of(meta)  # softmax or a sigmoid per label
        self.size = int(meta.input_size)
        self.model = None  # no torch module: body features come from the graph's "features" output (when it has one)
        self.bf16 = False
        self._input = session.get_inputs()[0].name
        outs = [o.name for o in session.get_outputs()]
        self._logits = outs[0]
        self._features = FEATURES_OUTPUT if FEATURES_OUTPUT in outs[1:] else None
        self._evidence = EVIDENCE_OUTPUT if EVIDENCE_OUTPUT in outs[1:] else None
        self.world = OpenWorld.from_meta(meta, source or "model")  # unknown detection and prediction sets (may be absent)
        if self._features is None:  # an export from before the features output: the score has nothing to work on
            self.world = self.world.without_features("this ONNX file has no body-features output, so it cannot tell "
                                                     "unknown pictures; export it again with `ursa export MODEL --onnx`")
        self._decoders = decoders or max(1, cores())

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Raw logits for a preprocessed batch float32 [N, 3, H, W]."""
        return self.session.run([self._logits], {self._input: np.ascontiguousarray(x, dtype=np.float32)})[0]

    @property
    def has_features(self) -> bool:
        """Whether the graph also outputs the pooled body features (exports since interpret/clean run on ONNX)."""
        return self._features is not None

    def check_features(self) -> None:
        """Raise NoFeaturesOutput when the file predates the features output (the caller then runs torch)."""
        if self._features is None:
            where = self.source or "this ONNX model"
            raise NoFeaturesOutput(f"{where}: has no body-features output (exported before ursa added it); "
                                   "export it again with `ursa export MODEL --onnx`")

    def logits_and_features(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw logits [N, C] and pooled body features [N, F] (float32) of a preprocessed batch, in one run."""
        self.check_features()
        logits, feats = self.session.run([self._logits, self._features],
                                         {self._input: np.ascontiguousarray(x, dtype=np.float32)})
        return logits, feats.astype(np.float32, copy=False)

    def logits_and_evidence(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw logits [N, K] and per-class evidence maps [N, K, h, w] of a preprocessed batch (``inference.explain``)."""
        if self._evidence is None:
            raise NoEvidenceOutput(f"{self.source or 'this ONNX model'}: has no evidence-map output (exported before "
                                   "ursa drew heat maps); export it again with `ursa export MODEL --onnx`")
        logits, maps = self.session.run([self._logits, self._evidence], {self._input: np.ascontiguousarray(x, dtype=np.float32)})
        return logits, maps

    def probs_and_features(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated probabilities (averaged over the TTA views) and the plain view's pooled body features (numpy)."""
        n = len(self.views)
        if n == 1:
            logits, feats = self.logits_and_features(x)
            return self.task.activate(logits / np.float32(self.temperature)), feats
        logits, feats = self.logits_and_features(view_batch(x, n))
        return mean_probs(logits, n, self.temperature, self.task), feats[: len(x)]

    def probs(self, x: np.ndarray) -> np.ndarray:
        """Calibrated probabilities for a preprocessed batch (the model's temperature applied; averaged over the TTA views)."""
        n = len(self.views)
        if n == 1:
            return self.task.activate(self.logits(x) / np.float32(self.temperature))
        return mean_probs(self.logits(view_batch(x, n)), n, self.temperature, self.task)

    def result(self, p: Sequence[float], threshold: float | None | str = "model", score: float | None = None) -> Prediction:
        """One row of probabilities (and its unknown score) as a Prediction, judged by the model's thresholds unless another is given."""
        values = [float(v) for v in p]
        i = int(np.argmax(values))
        pred = Prediction(self.classes[i], i, dict(zip(self.classes, values)), unknown_score=score)
        pred = pred.with_threshold(self.threshold if threshold == "model" else threshold)  # type: ignore[arg-type]
        return self.world.judge(self.task.answer(pred, self.thresholds))

    def predict_arrays(self, xs: Sequence[np.ndarray], threshold: float | None | str = "model") -> list[Prediction]:
        """Forward already-preprocessed images as one batch (with the body features when the model has an unknown detector)."""
        x = np.stack(list(xs))
        if self.world.detector is None:
            return [self.result(p, threshold) for p in self.probs(x)]
        probs, feats = self.probs_and_features(x)
        return [self.result(p, threshold, s) for p, s in zip(probs, self.world.scores(feats))]

    def predict_tensors(self, xs: Sequence[Any], threshold: float | None | str = "model") -> list[Prediction]:
        """The torch Predictor's name for ``predict_arrays`` (anything numpy can take), so code written for it runs here."""
        return self.predict_arrays([np.asarray(x, dtype=np.float32) for x in xs], threshold)

    def predict(self, source: Source) -> tuple[str, int, dict[str, float]]:
        """(label, index, probs) for one image, as fastai's learn.predict returns."""
        return self.predict_one(source).as_tuple()

    def predict_one(self, source: Source, threshold: float | None | str = "model") -> Prediction:
        """One image's full answer, unsure and unknown flags included."""
        return self.predict_arrays([self.preprocess(source)], threshold)[0]

    def predict_batch(self, sources: Sequence[Source], bs: int = 32,
                      threshold: float | None | str = "model") -> list[Prediction]:
        """Many images, batched, decoding in parallel; raises ImageError on the first unreadable one."""
        out: list[Prediction] = []
        for _, answer in self.stream(sources, bs, threshold):
            if isinstance(answer, ImageError):
                raise answer
            out.append(answer)
        return out

    def stream(self, sources: Iterable[Source], bs: int = 32,
               threshold: float | None | str = "model") -> Iterator[tuple[Source, Prediction | ImageError]]:
        """(source, Prediction or the ImageError that made it unreadable) in input order, batch by batch.

        Decoding runs in a thread pool up to two batches ahead of the network (``stream_batches``),
        so the decode of batch k+1 overlaps the forward pass of batch k.
        """
        yield from stream_batches(sources, bs, self.preprocess, lambda xs: self.predict_arrays(xs, threshold),
                                  self._decoders)

    def device_line(self) -> str:
        """Where this runs, for the first line a command prints: "device: cpu (2 threads)"."""
        return onnx_line(self.device, self.threads)

    def int8_report(self) -> Any:
        """The INT8 check stored by `ursa export --int8` (agreement, error change), or None for an fp32 file."""
        return _json_or_none(self.session.get_modelmeta().custom_metadata_map.get("int8"))

    def describe(self) -> dict[str, Any]:
        """What serve's /model says: enough for a client to know what it is talking to."""
        m = self.meta
        return {
            "classes": self.classes, "arch": m.arch, "input_size": self.size, "metrics": m.metrics,
            "version": m.ursa_version, "created": m.created, "format_version": m.format_version,
            "backend": "onnx", "device": self.device, "file": self.source.name if self.source else None,
            "temperature": self.temperature, "unsure_threshold": self.threshold, **self.world.describe(),
            "int8": self.int8_report(), "task": self.task.name, "thresholds": self.thresholds,
        }


def open_session(path: Path, threads: int, device: str = "cpu") -> Any:
    """A session for a user's .onnx file (`ort_session`'s settings), with one clear line when it is not ONNX."""
    if not path.is_file():
        raise ModelFileError(f"{path}: ONNX file not found; create it with `ursa export MODEL --onnx`")
    try:
        return ort_session(str(path), threads, spinning=True, device=device)
    except UrsaError:
        raise
    except Exception as e:  # onnxruntime raises its own exception types for bad files
        raise ModelFileError(f"{path}: not a readable ONNX model ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def _json_or_none(text: str | None) -> Any:
    """A metadata value that should be JSON; None when it is absent or damaged (it is only shown, never used)."""
    try:
        return loads(text) if text is not None else None
    except (ValueError, RecursionError):
        return None


def read_onnx_meta(session: Any, path: Path) -> tuple[ModelMeta, dict[str, Any]]:
    """The ursa metadata and the preprocessing an `ursa export --onnx` file carries."""
    props = session.get_modelmeta().custom_metadata_map
    if ONNX_META_KEY not in props:
        raise ModelFileError(f"{path}: not an ursa ONNX export (no {ONNX_META_KEY!r} metadata); create one with `ursa export MODEL --onnx`")
    meta = ModelMeta.from_json(props[ONNX_META_KEY], path)
    if PREPROCESS_KEY not in props:  # exports before the preprocess entry: the rule was the same
        return meta, preprocess_spec(meta.input_size, meta.mean, meta.std)
    try:
        spec = loads(props[PREPROCESS_KEY])
    except (ValueError, RecursionError):
        spec = None
    return meta, check_spec(spec, path, meta.input_size)


def load_onnx(path: str | Path, threads: int | None = None, tta: bool = False, device: str = "cpu") -> OnnxPredictor:
    """An ursa ONNX file ready to predict, without torch: the runtime's entry point (tta: average the trained mirrors too).

    ``device``: "cpu", or "cuda:N" on onnxruntime-gpu (``placement.onnx_device`` says which a --device gives).
    """
    path = Path(path)
    threads = threads or cores()
    session = open_session(path, threads, device)
    meta, spec = read_onnx_meta(session, path)
    check_session_fits(session, len(meta.classes), meta.input_size, path)
    return OnnxPredictor(session, meta, spec, source=path, tta=tta, device=device, threads=threads)


class Why(str):
    """Why a backend was picked: the text people read, and ``stale`` for code (an export of another model beside it)."""

    stale: bool

    def __new__(cls, text: str, stale: bool = False) -> "Why":
        why = super().__new__(cls, text)
        why.stale = stale
        return why


def stale_reason(onnx_meta: ModelMeta, meta: ModelMeta) -> str | None:
    """Why an ONNX export does not belong to this model file, or None when it does (mtimes lie, metadata doesn't).

    Decided from data both files carry: the weights' fingerprint (when both have one: files since
    ``modelfile.weights_fingerprint``), the creation time and the classes.
    """
    if onnx_meta.fingerprint and meta.fingerprint and onnx_meta.fingerprint != meta.fingerprint:
        return f"its weights are not this model file's (fingerprint {onnx_meta.fingerprint[:12]}, model {meta.fingerprint[:12]})"
    if onnx_meta.created != meta.created:
        return f"exported from the model created {onnx_meta.created or '?'}, this model file was created {meta.created or '?'}"
    if onnx_meta.classes != meta.classes:
        return "its classes differ from the model file's"
    return None


def current_onnx(path: str | Path, backend: str = "auto", threads: int | None = None,
                 tta: bool = False, device: Placement | None = None) -> tuple[OnnxPredictor | None, Why]:
    """The ONNX predictor that `backend` picks for `path` (torch-free), or None and why torch runs instead.

    The rule of ``predictor.resolve_backend``: a .onnx path runs itself (the file carries its own
    metadata: it is a whole model); "onnx" needs MODEL.onnx beside the model, exported from it
    (``stale_reason``; another model's export is a ModelFileError); "auto" uses it only when it is
    at least as new and exported from this model file, else torch with ``why.stale`` set; "torch"
    never. ``tta`` is passed to the predictor. ``device`` (``placement.place``; None: the CPU):
    where ONNX Runtime cannot run (MPS; CUDA without its CUDA provider) torch runs instead, and an
    .onnx file or "onnx" there is a DeviceError.
    """
    path = Path(path)
    check_backend(backend)
    where = device or CPU
    on = onnx_device(where)
    if path.suffix.lower() == ".onnx":
        if backend == "torch":
            raise UrsaError(f"{path}: --backend torch needs the model.safetensors file, not the ONNX export")
        if on is None:
            raise onnx_refusal(where, path.name)
        return load_onnx(path, threads, tta, on), Why("an .onnx file")
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found")
    beside = path.with_suffix(".onnx")
    if backend == "torch":
        return None, Why("--backend torch")
    if on is None:
        if backend == "onnx":
            raise onnx_refusal(where, "--backend onnx")
        return None, Why(f"ONNX Runtime cannot use {where.name} here")
    if not beside.is_file():
        if backend == "onnx":
            raise UrsaError(f"{beside}: ONNX file not found; create it with `ursa export {path} --onnx`")
        return None, Why(f"no {beside.name} beside the model (`ursa export {path} --onnx` makes one)")
    if backend == "auto" and beside.stat().st_mtime < path.stat().st_mtime:
        return None, Why(f"{beside.name} is older than the model file")
    from ursa.inference.header import read_meta

    try:
        pred = load_onnx(beside, threads, tta, on)
    except UrsaError as e:
        if backend == "onnx":
            raise
        # train writes model.onnx every time: a damaged one must not stop the model file itself from running
        return None, Why(f"{beside.name} is unusable ({str(e).splitlines()[0][:200]})")
    stale = stale_reason(pred.meta, read_meta(path, buildable=False))
    if stale and backend == "onnx":
        raise ModelFileError(f"{beside}: not exported from {path.name} ({stale}); export it again with "
                             f"`ursa export {path} --onnx`, or give --backend torch")
    if stale:
        return None, Why(f"{beside.name} is stale ({stale})", stale=True)
    return pred, Why(f"{beside.name} is current")


def current_onnx_with_features(path: str | Path, threads: int | None = None, tta: bool = False,
                               device: Placement | None = None) -> tuple[OnnxPredictor | None, Why]:
    """`current_onnx(path, "auto")` for interpret and clean: the ONNX predictor only when it also gives body features.

    None and the reason (shown to the user) when there is no current export, when it cannot be
    loaded, or when it predates the features output; the caller then runs torch.
    """
    try:
        pred, why = current_onnx(path, "auto", threads, tta, device)
        if pred is not None:
            pred.check_features()
    except UrsaError as e:  # a broken or old export beside a good model file: torch still works
        return None, Why(str(e))
    return pred, why


def backend_line(pred: OnnxPredictor | None, why: str) -> str:
    """The one line interpret and clean print about what runs the model, e.g. "ONNX Runtime (model.onnx is current)"."""
    return f"{'ONNX Runtime' if pred is not None else 'torch'} ({why})"

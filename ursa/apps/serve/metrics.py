"""What production sees: ``/metrics`` in the Prometheus text format and the drift line of ``/health``.

``ServeMetrics`` holds one process's figures in its own ``prometheus_client`` registry (so two
apps in one process never mix): requests by route and status, a latency histogram by route,
answers by class (an unknown answer counts under ``none of these``), and the unknown and unsure
answers as counters (Prometheus takes shares as ratios of rates) and as shares of the last N
answers (gauges). With ``--workers N`` each worker process answers for itself.

The drift line compares the last N answers with what the validation images gave when the model
was trained (``openset.figures["valid_mix"]``, and the unknown share 1 - kept): the unknown share
is flagged when it is more than 3 binomial standard errors above the validation share, the class
mix when its total variation distance from the validation mix is over ``MIX_ALERT``; both need at
least ``MIN_ANSWERS`` answers first.
"""

from __future__ import annotations

import math
import threading
from collections import Counter as Tally, deque
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

disable_created_metrics()  # no *_created series: they double the page and say only when the process started

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # the classic text format every Prometheus reads
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
NONE_OF_THESE = "none of these"
MIN_ANSWERS, MIX_ALERT, Z_ALERT = 50, 0.2, 3.0


class ServeMetrics:
    """One process's counters, histogram and window of recent answers (thread-safe)."""

    def __init__(self, classes: list[str], reference: dict[str, Any] | None = None, window: int = 500) -> None:
        self.classes, self.window = list(classes), int(window)
        ref = reference or {}
        self.valid_mix: dict[str, float] | None = ref.get("valid_mix")
        kept = ref.get("kept_valid")
        self.valid_unknown = None if kept is None else 1.0 - float(kept)
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("ursa_requests", "HTTP requests to the prediction routes", ["route", "status"], registry=r)
        self.latency = Histogram("ursa_request_seconds", "Time to answer a prediction request", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.answers = Counter("ursa_answers", "Answers given, by class (unknown answers as 'none of these')", ["label"],
                               registry=r)
        self.unknown = Counter("ursa_unknown_answers", "Answers judged unlike the training images", registry=r)
        self.unsure = Counter("ursa_unsure_answers", "Answers below the unsure threshold", registry=r)
        self.unknown_share = Gauge("ursa_unknown_share", "Share of the last answers judged unknown", registry=r)
        self.unsure_share = Gauge("ursa_unsure_share", "Share of the last answers judged unsure", registry=r)
        self._recent: deque[tuple[str, bool | None, bool]] = deque(maxlen=self.window)
        self._lock = threading.Lock()

    def request(self, route: str, status: int, seconds: float) -> None:
        """One request to a prediction route answered."""
        self.requests.labels(route=route, status=str(status)).inc()
        self.latency.labels(route=route).observe(seconds)

    def answer(self, label: str, unknown: bool | None, unsure: bool) -> None:
        """One picture answered (a batch request gives several)."""
        self.answers.labels(label=NONE_OF_THESE if unknown else label).inc()
        if unknown:
            self.unknown.inc()
        if unsure:
            self.unsure.inc()
        with self._lock:
            self._recent.append((label, unknown, unsure))
            recent = list(self._recent)
        judged = [u for _, u, _ in recent if u is not None]
        if judged:
            self.unknown_share.set(sum(judged) / len(judged))
        self.unsure_share.set(sum(s for _, _, s in recent) / len(recent))

    def exposition(self) -> bytes:
        """The Prometheus text format of everything above."""
        return generate_latest(self.registry)

    def drift(self) -> dict[str, Any]:
        """The last N answers against the validation images: unknown share, class mix, and whether either moved."""
        with self._lock:
            recent = list(self._recent)
        n = len(recent)
        judged = [u for _, u, _ in recent if u is not None]
        unknown = sum(judged) / len(judged) if judged else None
        tally = Tally(label for label, u, _ in recent if not u)
        known = sum(tally.values())
        mix = {c: tally[c] / known for c in self.classes} if known else None
        tv = (0.5 * sum(abs(mix[c] - self.valid_mix.get(c, 0.0)) for c in self.classes)
              if mix is not None and self.valid_mix else None)
        unknown_alert = mix_alert = False
        if unknown is not None and self.valid_unknown is not None and len(judged) >= MIN_ANSWERS:
            p = max(self.valid_unknown, 1e-3)
            unknown_alert = (unknown - p) / math.sqrt(p * (1 - p) / len(judged)) > Z_ALERT
        if tv is not None and known >= MIN_ANSWERS:
            mix_alert = tv > MIX_ALERT
        if n == 0:
            line = "no answers yet"
        else:
            said = "unknown share cannot be told (model without a reference)" if unknown is None else (
                f"{100 * unknown:.1f}% unknown" + (f" (validation: {100 * self.valid_unknown:.1f}%)"
                                                   if self.valid_unknown is not None else ""))
            line = f"last {n} answer{'s' if n > 1 else ''}: {said}" + (f"; class mix {tv:.2f} from the validation mix (total variation)"
                                                  if tv is not None else "")
            if unknown_alert or mix_alert:
                line += "; DRIFT: the pictures sent no longer look like the validation set"
            elif n < MIN_ANSWERS:
                line += f"; too few answers to judge drift (needs {MIN_ANSWERS})"
        return {"window": self.window, "answers": n, "unknown_share": unknown, "unknown_share_valid": self.valid_unknown,
                "class_mix": mix, "class_mix_valid": self.valid_mix, "mix_distance": tv,
                "drift": bool(unknown_alert or mix_alert), "unknown_drift": bool(unknown_alert),
                "mix_drift": bool(mix_alert), "line": line}

"""Everything one studio serves, owned in one place: the project, thumbnails, jobs, the latest run's review and live model."""

from __future__ import annotations

import shlex
import threading
from pathlib import Path
from typing import Any

from ursa.apps.studio.jobs import Jobs
from ursa.apps.studio.project import Project
from ursa.apps.studio.review import Live, Review
from ursa.apps.studio.thumbs import Thumbs
from ursa.errors import UrsaError

PAGE_SIZE = 24  # thumbnails per page of a class: what a card shows without scrolling (it asks for more as it scrolls)


def default_runs(project: Path) -> Path:
    """Where runs go when not told: beside the project (PROJECT-runs), since training never writes into the data."""
    project = Path(project).resolve()
    return project.with_name(project.name + "-runs")


class Studio:
    """The project folder, its runs folder and what was made from them; the app's one resource."""

    def __init__(self, project: Path, runs: Path | None = None, threads: int | None = None) -> None:
        self.project = Project(project)
        self.runs = Path(runs) if runs else default_runs(project)
        self.thumbs = Thumbs()
        self.jobs = Jobs(self.project.root, self.runs)
        self.live = Live(threads)
        self.review: Review | None = None
        self.problem = ""  # why the latest run could not be loaded
        self._lock = threading.Lock()

    def refresh(self) -> None:
        """Pick up the newest finished run (after a job, or one the CLI wrote): its review and live model."""
        run = self.jobs.latest_run()
        if run is None or (self.review is not None and self.review.run == run and self.live.run == run):
            return
        with self._lock:
            if self.review is not None and self.review.run == run and self.live.run == run:
                return  # another request loaded it while this one waited: one Review per run (it may hold the cleaner)
            try:
                review = Review(self.project.root, run)
                self.live.load(run)
                old, self.review, self.problem = self.review, review, ""
                if old is not None:
                    old.close()  # its cleaner's session and lock: a new model means a new model pass
            except Exception as e:  # noqa: BLE001 - ONNX Runtime and safetensors raise their own types: the page says it
                self.problem = f"{run}: {e if isinstance(e, (UrsaError, OSError, ValueError)) else repr(e)}"

    def state(self) -> dict[str, Any]:
        """The page's first answer: classes with counts, the job, whether there is a model."""
        counts = self.project.counts()
        job = self.jobs.current
        return {
            "project": str(self.project.root), "runs": str(self.runs),
            "classes": [{"name": c, "count": n} for c, n in counts.items()], "total": sum(counts.values()),
            "page_size": PAGE_SIZE, "job": job.to_json() if job else None,
            "run": str(self.review.run) if self.review else None, "problem": self.problem,
            "leakage": self.project.leakage(),
        }

    def page(self, cls: str, offset: int, limit: int = PAGE_SIZE) -> dict[str, Any]:
        """One page of a class's image names (newest first)."""
        names = self.project.images(cls)
        return {"class": cls, "total": len(names), "offset": offset, "names": names[offset:offset + limit]}

    def ship(self) -> dict[str, Any]:
        """The exact commands that serve the latest run, on this machine and in Docker (docs/deploy.md)."""
        if self.review is None:
            return {}
        model = self.review.run / "model.safetensors"
        onnx = self.review.run / "model.onnx"
        q = shlex.quote
        return {
            "serve": f"ursa serve {q(str(model))}",
            "docker": [f"docker build -t ursa-serve .",
                       f"docker run -d --name ursa -p 8000:8000 -v {q(str(onnx))}:/model/model.onnx:ro ursa-serve",
                       "curl --data-binary @photo.jpg http://127.0.0.1:8000/predict"],
            "retrain": f"ursa train {q(str(self.project.root))} --out {q(str(self.jobs.next_run()))}",
        }

    def close(self) -> None:
        self.jobs.close()
        if self.review is not None:
            self.review.close()

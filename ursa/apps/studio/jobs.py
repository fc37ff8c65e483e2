"""The studio's long work as the CLI's own commands in a child process: `ursa train`, `ursa export --int8`,
`ursa download`, `ursa show`.

The page stays live because the work is another process; it is the same run folder the CLI writes
because it is the CLI. Progress is read from what the run writes as data (the checkpoint's epoch
rows while it trains, history in report.json at the end), never parsed from its console, which
the page shows as text. One job at a time; cancel ends the child's process group, and since
training never writes into the data folder, the project is as it was.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ursa.training.config import BALANCES  # torch-free
from ursa.training.runfolder import CHECKPOINT  # torch-free (training.checkpoint imports torch)
from ursa.util.files import atomic_write_text
from ursa.util.lifeline import child_env, lifeline

CHECKPOINT_INDEX = "checkpoint.json"  # training.checkpoint.INDEX
PREVIEW = "batch.png"  # RUNS/preview/batch.png: the latest batch preview
CONSOLE_LINES = 60  # console lines the page shows
STOP_WAIT = 10.0  # seconds between SIGTERM and SIGKILL


class Busy(Exception):
    """A job is running: one at a time."""


@dataclass(frozen=True)
class TrainOptions:
    """What the page may choose for a run (checked here: "expected X, got Y"); the rest is the default recipe."""

    epochs: int | None = None
    budget: int | None = None  # seconds of the reference machine; 0: the frozen stage only
    size: int | None = None
    balance: str | None = None  # --balance: auto, none, weights, sampler or logit_adjust (training.config.BALANCES)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> "TrainOptions":
        def number(key: str, lo: int, hi: int) -> int | None:
            v = body.get(key)
            if v in (None, ""):
                return None
            if isinstance(v, bool) or not isinstance(v, (int, str)) or not str(v).strip().isdigit() or not lo <= int(v) <= hi:
                raise ValueError(f"{key}: expected a whole number from {lo} to {hi}, got {str(v)[:20]!r}")
            return int(v)
        balance = body.get("balance")
        if balance in (None, ""):
            balance = None
        elif balance not in BALANCES:
            raise ValueError(f"balance: expected one of {', '.join(BALANCES)}, got {str(balance)[:20]!r}")
        return cls(number("epochs", 1, 100), number("budget", 0, 36000), number("size", 32, 1024), balance)

    def argv(self) -> list[str]:
        out = []
        for flag, v in (("--epochs", self.epochs), ("--budget", self.budget), ("--size", self.size),
                        ("--balance", self.balance)):
            if v is not None:
                out += [flag, str(v)]
        return out


@dataclass
class Job:
    """One child process: the command, its console file, and how it ended."""

    kind: str  # "train", "int8", "download" or "preview"
    argv: list[str]
    run: Path
    console: Path
    proc: subprocess.Popen | None = None
    lifeline: int | None = None  # the pipe's write end: while the studio lives, so does the child (util.lifeline)
    _cut: threading.Lock = field(default_factory=threading.Lock, repr=False)
    started: float = field(default_factory=time.time)
    ended: float | None = None
    cancelled: bool = False

    @property
    def state(self) -> str:
        """running, done, failed or cancelled."""
        if self.proc is None or self.proc.poll() is None:
            return "running"
        self.cut_lifeline()
        if self.cancelled:
            return "cancelled"
        return "done" if self.proc.returncode == 0 else "failed"

    def start(self) -> None:
        self.console.parent.mkdir(parents=True, exist_ok=True)
        read_end, self.lifeline = lifeline()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "120", **child_env(read_end)}
        try:
            with open(self.console, "wb") as out:  # the child holds its own descriptor
                self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             env=env, start_new_session=True, pass_fds=(read_end,))
        except BaseException:
            os.close(self.lifeline)
            self.lifeline = None
            raise
        finally:
            os.close(read_end)

    def cut_lifeline(self) -> None:
        """Close the pipe's write end once the child has ended (the child would end if it still ran)."""
        with self._cut:
            fd, self.lifeline = self.lifeline, None
        if fd is not None:
            os.close(fd)

    def cancel(self) -> None:
        """End the child (its process group: loader workers too), politely first."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.cancelled = True
        for sig, wait in ((signal.SIGTERM, STOP_WAIT), (signal.SIGKILL, STOP_WAIT)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue

    def tail(self, n: int = CONSOLE_LINES) -> list[str]:
        """The last n lines of its console (progress bars' carriage returns keep their last state)."""
        try:
            with open(self.console, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 32768))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return []
        return [line.rsplit("\r", 1)[-1] for line in text.splitlines()[-n:]]

    def epochs(self) -> list[dict]:
        """The epoch rows so far: report.json's history once written, else the last checkpoint's rows."""
        for path, key in ((self.run / "report.json", "history"), (self.run / CHECKPOINT / CHECKPOINT_INDEX, "recorder")):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            rows = data.get(key) or []
            return list(rows.get("rows", []) if isinstance(rows, dict) else rows)
        return []

    def to_json(self) -> dict[str, Any]:
        rc = None if self.proc is None else self.proc.poll()
        if rc is not None and self.ended is None:
            self.ended = time.time()
        return {"kind": self.kind, "state": self.state, "run": str(self.run), "returncode": rc,
                "elapsed": round((self.ended or time.time()) - self.started, 1), "epochs": self.epochs(),
                "console": self.tail(), "command": " ".join(self.argv[2:])}


class Jobs:
    """The one job running (or the last one), and where runs go: RUNS/run-N, never inside the project."""

    def __init__(self, project: Path, runs: Path, python: str = sys.executable) -> None:
        self.project, self.runs, self.python = Path(project), Path(runs), python
        self.current: Job | None = None
        self._lock = threading.Lock()

    def next_run(self) -> Path:
        n = 1
        while (self.runs / f"run-{n}").exists() or (self.runs / f"run-{n}.console.txt").exists():
            n += 1
        return self.runs / f"run-{n}"

    def latest_run(self) -> Path | None:
        """The newest finished run folder (with a model file), or None."""
        if not self.runs.is_dir():
            return None
        job = self.current
        writing = job.run if job is not None and job.kind == "train" and job.state == "running" else None
        done = [p for p in self.runs.iterdir() if p.is_dir() and p != writing and (p / "model.safetensors").is_file()]
        return max(done, key=lambda p: (p / "model.safetensors").stat().st_mtime, default=None)

    def _start(self, kind: str, argv: list[str], run: Path, console: Path) -> Job:
        with self._lock:
            if self.current is not None and self.current.state == "running":
                raise Busy(f"a {self.current.kind} job is running; wait for it or cancel it")
            job = Job(kind, [self.python, "-m", "ursa", *argv], run, console)
            job.start()
            self.current = job
            return job

    def train(self, options: TrainOptions) -> Job:
        """`ursa train PROJECT --out RUNS/run-N` with the page's options."""
        run = self.next_run()
        return self._start("train", ["train", str(self.project), "--out", str(run), *options.argv()], run,
                           run.with_name(run.name + ".console.txt"))

    def int8(self, run: Path) -> Job:
        """`ursa export RUN/model.safetensors --int8`: the checked INT8 copy beside the model."""
        return self._start("int8", ["export", str(run / "model.safetensors"), "--int8", "--data", str(self.project)],
                           run, run / "int8.console.txt")

    def preview(self) -> Job:
        """`ursa show PROJECT --out RUNS/preview/batch.png`: counts, the split and a grid of augmented training images."""
        folder = self.runs / "preview"
        return self._start("preview", ["show", str(self.project), "--out", str(folder / PREVIEW)], folder,
                           folder / "show.console.txt")

    def download(self, cls: str, urls: list[str]) -> Job:
        """`ursa download CLASS=LIST --dest PROJECT`: download's safe fetcher (public addresses only, size caps, retries)."""
        lists = self.runs.resolve() / "url-lists"
        n = 1
        while (lists / f"{n:04d}").exists():
            n += 1
        # urls_CLASS.txt names the class by the file's name, not CLASS=FILE: a class "a=b" stays "a=b"; the absolute
        # path never starts with '-', so a class "-x" is not read as an option
        path = lists / f"{n:04d}" / f"urls_{cls}.txt"
        path.parent.mkdir(parents=True)
        atomic_write_text(path, "".join(u.strip() + "\n" for u in urls if u.strip()))
        return self._start("download", ["download", "--dest", str(self.project), str(path)], self.runs,
                           path.parent / "console.txt")

    def cancel(self) -> Job | None:
        job = self.current
        if job is not None:
            job.cancel()
        return job

    def close(self) -> None:
        """The studio stops: a running job is cancelled, never left behind."""
        self.cancel()

"""Steps that are skipped when done.

A step is done when its outputs exist complete (tools write them atomically:
checkpoint directories appear whole, with their tracker file; JSON files are
renamed into place) and its record in ``<workdir>/state/<step>.json`` carries the
same fingerprint: a hash of the step's settings and of the records of the steps
it reads from. So changing ``--iters`` redoes the training runs and everything
after them, and nothing before; a step interrupted half-way is redone whole.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ders_megatron.io.atomic import write_text_atomic


@dataclass
class Step:
    """One unit of work: ``run()`` returns a JSON-able summary kept in its record."""

    name: str
    desc: str
    run: Callable[[], dict | None]
    outputs: tuple[Path, ...] = ()  # removed before the step runs again
    complete: Callable[[], bool] = lambda: True
    settings: dict = field(default_factory=dict)
    deps: tuple[str, ...] = ()
    always: bool = False  # cheap summaries: run every time


class Runner:
    def __init__(self, workdir: Path, force: bool = False, log: Callable[[str], None] = print):
        self.state_dir = workdir / "state"
        self.force = force
        self.log = log
        self.records: dict[str, dict] = {}

    def record(self, name: str) -> dict:
        return self.records.get(name) or self._read(name) or {}

    def _read(self, name: str) -> dict | None:
        path = self.state_dir / f"{name}.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def fingerprint(self, step: Step) -> str:
        deps = {d: [self.record(d).get("fingerprint"), self.record(d).get("finished")] for d in step.deps}
        text = json.dumps({"settings": step.settings, "deps": deps}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def is_done(self, step: Step, fingerprint: str) -> bool:
        saved = self._read(step.name)
        return (not self.force and not step.always and saved is not None
                and saved.get("fingerprint") == fingerprint and step.complete())

    def run(self, steps: list[Step]) -> dict[str, dict]:
        for number, step in enumerate(steps, 1):
            prefix = f"[{number}/{len(steps)}]"
            fingerprint = self.fingerprint(step)
            if self.is_done(step, fingerprint):
                self.records[step.name] = self._read(step.name)
                self.log(f"{prefix} skipping {step.name} (done)")
                continue
            self.log(f"{prefix} {step.desc}")
            for path in step.outputs:
                _remove(path)
            start = time.perf_counter()
            summary = step.run() or {}
            record = {"step": step.name, "fingerprint": fingerprint, "finished": time.time(),
                      "seconds": time.perf_counter() - start, "summary": summary}
            write_text_atomic(self.state_dir / f"{step.name}.json", json.dumps(record, indent=2, default=str) + "\n")
            self.records[step.name] = record
        return self.records


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()

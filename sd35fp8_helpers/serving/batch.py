"""``sd35fp8 batch PROMPTS --broker URL --out DIR``: a prompt file fanned out over every worker of a queue.

* **Input**: a ``.txt`` file (one prompt per line; blank lines and ``#`` comments skipped; seeds ``--seed``,
  ``--seed + 1``, … in line order) or a ``.jsonl`` file (one object per line: ``prompt`` and optionally
  ``seed``, ``steps``, ``size`` ``"WxH"``, ``guidance_scale``, ``negative_prompt``).
* **Checked first**: every line against the model the workers registered; a bad line is reported with its
  number and the fix and is never enqueued — the other lines go on.
* **Output**: one PNG per line in DIR, its settings in the PNG metadata (``generate --from-png`` re-renders it),
  and ``manifest.jsonl``: one line per finished job with prompt, seed, settings, worker, seconds, attempts and
  the sha256 of the file and of its pixels. Lines are appended (and fsync'ed) as jobs finish.
* **Re-running skips what is done**: a job's id is a hash of its settings, the model and DIR, so the same line
  is the same job — already in the manifest: skipped; still queued or running from an interrupted run:
  waited for, not enqueued twice. A failed job is reported at the end (exit code 1) and retried on the next run.

Example::

    sd35fp8 batch prompts.txt --broker redis://127.0.0.1:6379/0 --out renders/ --steps 28 --size 1024x1024
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidGenerationInput, Sd35fp8Error
from ..pipeline.generation import GenerationSettings, check_settings
from .config import SIZE_PATTERN
from .jobstore import DEFAULT_RESULT_TTL_S, JobStore, ServedModel

MANIFEST = "manifest.jsonl"
BATCH_IDENTITY = "batch"
JSONL_FIELDS = frozenset({"prompt", "seed", "steps", "size", "guidance_scale", "negative_prompt"})


@dataclass(frozen=True)
class BatchItem:
    """One line of the prompt file: its settings, or why it cannot run."""

    line: int
    settings: GenerationSettings | None
    error: str = ""


@dataclass
class BatchSummary:
    """What a run did. ``failed``: ``(line, message)`` for bad lines and jobs that failed or were cancelled."""

    done: int = 0
    skipped: int = 0
    failed: list[tuple[int, str]] = field(default_factory=list)
    manifest: Path | None = None
    seconds: float = 0.0
    workers: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed

    def line(self) -> str:
        used = ", ".join(f"{w}: {n}" for w, n in sorted(self.workers.items())) or "none"
        return (f"{self.done} done, {self.skipped} already done (skipped), {len(self.failed)} failed in "
                f"{self.seconds:.1f} s; jobs per worker: {used}; manifest: {self.manifest}")


def read_prompts(path: str | Path, served: ServedModel, *, seed: int = 0, steps: int | None = None,
                 size: str | None = None, guidance_scale: float | None = None,
                 negative_prompt: str = "") -> list[BatchItem]:
    """Every line of a ``.txt`` / ``.jsonl`` prompt file as settings checked against ``served``."""
    path = Path(path)
    if not path.is_file():
        raise Sd35fp8Error(f"prompt file {path} does not exist", fix="one prompt per line (.txt) or JSON lines (.jsonl)")
    if path.suffix not in (".txt", ".jsonl"):
        raise Sd35fp8Error(f"prompt file {path.name}: expected .txt or .jsonl",
                           fix="one prompt per line in a .txt file, or {\"prompt\": …} objects in a .jsonl file")
    native, default_steps = served.defaults()
    multiple, max_side = served.limits()
    items: list[BatchItem] = []
    index = 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        text = raw.strip()
        if not text or (path.suffix == ".txt" and text.startswith("#")):
            continue
        entry: dict[str, Any] = {"prompt": text}
        if path.suffix == ".jsonl":
            try:
                entry = json.loads(text)
                assert isinstance(entry, dict)
            except (ValueError, AssertionError):
                items.append(BatchItem(number, None, "not a JSON object like {\"prompt\": \"a fox\"}"))
                continue
            unknown = sorted(set(entry) - JSONL_FIELDS)
            if unknown:
                items.append(BatchItem(number, None, f"unknown field(s) {', '.join(unknown)}; allowed: "
                                                     f"{', '.join(sorted(JSONL_FIELDS))}"))
                continue
        w = h = native
        spec = entry.get("size", size)
        if spec is not None:
            match = SIZE_PATTERN.match(str(spec))
            if not match:
                items.append(BatchItem(number, None, f"size={spec!r} is not WIDTHxHEIGHT, e.g. '{native}x{native}'"))
                continue
            w, h = int(match[1]), int(match[2])
        settings = GenerationSettings(
            prompt=entry.get("prompt", ""), negative_prompt=entry.get("negative_prompt", negative_prompt),
            seed=entry.get("seed", seed + index), steps=entry.get("steps", steps or default_steps),
            guidance_scale=entry.get("guidance_scale", guidance_scale if guidance_scale is not None
                                     else served.default_guidance()),
            height=h, width=w)
        index += 1
        try:
            check_settings(settings, multiple=multiple, max_side=max_side)
        except InvalidGenerationInput as exc:
            items.append(BatchItem(number, None, exc.one_line))
            continue
        items.append(BatchItem(number, settings))
    return items


def batch_job_id(settings: GenerationSettings, served: ServedModel, out_dir: Path) -> str:
    """The same line, model and output folder → the same job id (what makes a re-run skip finished work)."""
    key = json.dumps({"settings": asdict(settings), "model": served.model, "precision": served.precision,
                      "out": str(out_dir.resolve())}, sort_keys=True)
    return "batch-" + hashlib.sha256(key.encode()).hexdigest()[:32]


def _done_ids(manifest: Path) -> set[str]:
    done = set()
    if manifest.is_file():
        for raw in manifest.read_text().splitlines():
            try:
                row = json.loads(raw)
            except ValueError:
                continue  # a line cut by a crash: that job runs again
            if (manifest.parent / row.get("file", "")).is_file():
                done.add(row["job_id"])
    return done


def _write(out_dir: Path, manifest: Path, item: BatchItem, job_id: str, record, png: bytes) -> str:
    from PIL import Image

    name = f"{item.line:04d}-{job_id.removeprefix('batch-')[:8]}.png"
    tmp = out_dir / f".{name}.partial"
    tmp.write_bytes(png)
    tmp.replace(out_dir / name)
    with Image.open(io.BytesIO(png)) as img:
        pixels = hashlib.sha256(img.tobytes()).hexdigest()
    row = {"job_id": job_id, "line": item.line, "prompt": item.settings.prompt, "seed": item.settings.seed,
           "settings": asdict(item.settings), "worker": record.worker,
           "seconds": round(record.run_s, 4) if record.run_s is not None else None,
           "queue_wait_s": round(record.queue_wait_s, 4) if record.queue_wait_s is not None else None,
           "attempts": record.attempts, "file": name, "sha256": hashlib.sha256(png).hexdigest(),
           "pixels_sha256": pixels}
    with open(manifest, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return name


def run_batch(prompts: str | Path, broker: str, out_dir: str | Path, *, seed: int = 0, steps: int | None = None,
              size: str | None = None, guidance_scale: float | None = None, negative_prompt: str = "",
              timeout_s: float | None = None, progress: bool = True, poll_s: float = 0.1,
              result_ttl_s: int = DEFAULT_RESULT_TTL_S) -> BatchSummary:
    """Fan ``prompts`` out over the workers of ``broker``; write PNGs and ``manifest.jsonl`` into ``out_dir``."""
    from tqdm.auto import tqdm

    from .queue import enqueue

    start = time.perf_counter()
    store = JobStore(broker)
    served = store.served_model()
    if served is None:
        raise Sd35fp8Error(f"no worker has started on the queue at {store.safe_url}, so nothing would run",
                           fix=f"start one first: sd35fp8 worker --broker {store.safe_url} --model MODEL")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / MANIFEST
    summary = BatchSummary(manifest=manifest)
    items = read_prompts(prompts, served, seed=seed, steps=steps, size=size, guidance_scale=guidance_scale,
                         negative_prompt=negative_prompt)
    summary.failed += [(i.line, i.error) for i in items if i.settings is None]
    done = _done_ids(manifest)
    pending: dict[str, BatchItem] = {}
    for item in items:
        if item.settings is None:
            continue
        job_id = batch_job_id(item.settings, served, out)
        if job_id in done or job_id in pending:
            summary.skipped += 1
            continue
        outcome = store.create(job_id, [asdict(item.settings)], identity=BATCH_IDENTITY, source="batch",
                               result_ttl=result_ttl_s)
        if outcome == "exists":
            old = store.get(job_id)
            if old is not None and old.state in ("failed", "cancelled"):  # retried on a new run
                store.forget(job_id)
                outcome = store.create(job_id, [asdict(item.settings)], identity=BATCH_IDENTITY, source="batch",
                                       result_ttl=result_ttl_s)
        if outcome == "ok":
            enqueue(broker, job_id)
        pending[job_id] = item  # "exists" and still queued/running/done: wait for it, never enqueue twice
    bar = tqdm(total=len(pending), desc="jobs", unit="job", disable=not progress)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while pending:
            for job_id, record in store.get_many(pending).items():
                item = pending[job_id]
                if record is None:
                    summary.failed.append((item.line, "the job's record expired before it was read"))
                elif record.state == "done":
                    pngs = store.results(job_id)
                    if not pngs:
                        summary.failed.append((item.line, "the job's images expired before they were read"))
                    else:
                        _write(out, manifest, item, job_id, record, pngs[0])
                        summary.done += 1
                        summary.workers[record.worker] = summary.workers.get(record.worker, 0) + 1
                elif record.final:
                    summary.failed.append((item.line, f"{record.state}: {record.error or record.error_code}"))
                else:
                    continue
                del pending[job_id]
                bar.update(1)
            if pending:
                if deadline is not None and time.monotonic() > deadline:
                    for item in pending.values():
                        summary.failed.append((item.line, f"not finished after {timeout_s:g} s (still queued: "
                                                          "re-run the same command to collect it)"))
                    break
                time.sleep(poll_s)
    finally:
        bar.close()
    summary.failed.sort()
    summary.seconds = time.perf_counter() - start
    return summary

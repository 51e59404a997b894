"""``sd35fp8 setup``: one command from nothing to a verified first image — and again, in seconds.

A new team member runs ``sd35fp8 setup MODEL --dir DIR`` and reaches the same working setup as everyone
else. The stages, each printed as a heading with its result and duration::

    doctor → disk → fetch → verify → load → smoke → summary

* **doctor** stops early on what would fail later (old torch, missing git-lfs for a git source …).
* **disk** checks free space against what will be downloaded *before* downloading (for a git URL it first
  clones the pointer files — a few KB — to learn the real sizes).
* **fetch** downloads (hub), or ``git lfs pull``s (git), or builds (``tiny``); local sources need nothing.
* **verify** checks every weight file's header and sha256 (pointer oid, or the download manifest).
* **load** loads the pipeline with the chosen precision and reports bytes per component.
* **smoke** generates one small image, saved with its settings in the PNG.

It is idempotent: ``DIR/setup-state.json`` records what each stage proved, with each verified file's size,
modification time and sha256, so a second run re-hashes nothing that did not change, re-downloads nothing
that is complete, and says so. A stage is recorded only once it succeeded, so an interrupted or failed run
resumes where it stopped and never leaves something half-done looking complete. A failing stage exits
with its own code (:data:`EXIT_CODES`), names itself, and prints the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..constants import DISK_SAFETY_FACTOR
from ..errors import Sd35fp8Error, SetupStageFailed
from ..vocabulary import SourceKind

Precision = Literal["auto", "bf16", "fp8-storage", "fp8-compute"]
STAGES = ("doctor", "disk", "fetch", "verify", "load", "smoke", "summary")
EXIT_CODES = {stage: 10 + i for i, stage in enumerate(STAGES)}
"""A failing stage exits with its own code: doctor 10, disk 11, fetch 12, verify 13, load 14, smoke 15."""
_UNEXPECTED_FIX = {
    "doctor": "run `sd35fp8 doctor` to see the failing check",
    "disk": "check the destination folder (--dir) exists and is writable",
    "fetch": "check the source and your network; run the same command again to resume",
    "verify": "run `sd35fp8 verify MODEL_DIR` for the per-file report",
    "load": "check that the folder is a complete SD3.5 diffusers pipeline (`sd35fp8 verify MODEL_DIR`) and that "
            "--precision suits this machine (`sd35fp8 doctor`)",
    "smoke": "check free memory and that --dir is writable; `sd35fp8 generate --model MODEL_DIR` shows the error",
}
"""Fix shown when a stage fails with an error sd35fp8 did not anticipate (the error itself is shown too)."""
STATE_FILE = "setup-state.json"
SCENE_SMOKE_PROMPT = "a large red circle in the centre, on a white background"
"""What the smoke stage draws with a trained scene model (at its own steps and size), then reads with the judge."""
SMOKE_IMAGE = "smoke.png"


@dataclass(frozen=True)
class SetupConfig:
    """What to set up, where, and how. ``model``: hub repo id, git URL, local folder, Comfy FP8 file or ``tiny``."""

    model: str
    dir: Path = Path("sd35fp8-setup")
    precision: Precision = "auto"
    include: tuple[str, ...] = ()  # hub: only these patterns (default: the diffusers layout)
    base: str | None = None  # Comfy single files: where configs, tokenizers and the VAE come from (None: inferred)
    device: str | None = None
    dry_run: bool = False
    free_bytes: int | None = None  # pretend this much disk is free ("would it fit on my laptop?"); None: measure

    def __post_init__(self) -> None:
        from ..vocabulary import PRECISIONS

        if self.precision not in ("auto", *PRECISIONS):
            raise ValueError(f"precision={self.precision!r}; choose auto, bf16, fp8-storage or fp8-compute")
        object.__setattr__(self, "dir", Path(self.dir).absolute())


@dataclass
class StageResult:
    stage: str
    status: Literal["ok", "skipped", "failed", "planned"]
    detail: str
    seconds: float = 0.0
    fix: str = ""

    def line(self, index: int) -> str:
        head = f"== {index}/{len(STAGES)} {self.stage} "
        text = f"{head:.<24} {self.status.upper() if self.status == 'failed' else self.status} " \
               f"({self.seconds:.1f} s): {self.detail}"
        return text + (f"\n   fix: {self.fix}" if self.fix else "")


@dataclass
class SetupResult:
    config: SetupConfig
    source: SourceKind
    stages: list[StageResult] = field(default_factory=list)
    model_path: Path | None = None
    image: Path | None = None

    @property
    def failed(self) -> StageResult | None:
        return next((s for s in self.stages if s.status == "failed"), None)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.failed.stage] if self.failed else 0

    def to_json(self) -> str:
        return json.dumps({"model": self.config.model, "source": self.source, "dir": str(self.config.dir),
                           "exit_code": self.exit_code, "model_path": str(self.model_path or ""),
                           "image": str(self.image or ""), "stages": [asdict(s) for s in self.stages]}, indent=2)


def classify_source(model: str) -> SourceKind:
    """``tiny`` | an existing folder | an existing ``.safetensors`` file | a git URL | a hub repo id.

    The one classifier (:func:`~sd35fp8_helpers.vocabulary.classify_model_spec`); a name it cannot place fails
    the doctor stage with its message and fix.
    """
    from ..errors import ModelNotFound
    from ..vocabulary import classify_model_spec

    try:
        return classify_model_spec(model).kind
    except ModelNotFound as exc:
        raise SetupStageFailed("doctor", str(exc).split("\n")[0], fix=exc.fix) from exc


# --- state: what earlier runs proved ---------------------------------------------------------------------

def _load_state(directory: Path) -> dict[str, Any]:
    try:
        return json.loads((directory / STATE_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _save_state(directory: Path, state: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{STATE_FILE}.partial"
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, directory / STATE_FILE)  # never a half-written state file


def _weight_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*.safetensors") if ".git" not in p.parts)


def _fingerprint(path: Path) -> dict[str, list[int]]:
    """``{file: [size, mtime_ns]}`` of every weight file: cheap to take, changes when a file does."""
    root = path if path.is_dir() else path.parent
    return {p.relative_to(root).as_posix(): [p.stat().st_size, p.stat().st_mtime_ns] for p in _weight_files(path)}


def image_sha256(path: Path) -> str:
    """sha256 of the decoded pixels (not the PNG bytes, whose metadata holds timings)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as img:
        return hashlib.sha256(np.asarray(img.convert("RGB")).tobytes()).hexdigest()


# --- stages ------------------------------------------------------------------------------------------------

class _Run:
    """One execution of the stages; each ``_stage_*`` returns (status, detail) or raises SetupStageFailed."""

    def __init__(self, config: SetupConfig, echo: Callable[[str], None]) -> None:
        self.config, self.echo = config, echo
        self.source = classify_source(config.model)
        self.state = _load_state(config.dir)
        if self.state.get("model") != config.model:  # another model in the same folder: start over
            self.state = {"model": config.model, "source": self.source, "files": {}}
        self.result = SetupResult(config, self.source)
        self.pipe, self.precision = None, None

    @property
    def model_path(self) -> Path:
        if self.source == "embedded":
            from ..constants import EMBEDDED_MODEL_DIR

            return EMBEDDED_MODEL_DIR
        if self.source in ("local", "comfy-file"):
            return Path(self.config.model).expanduser().absolute()
        return self.config.dir / "model"

    def _done(self, stage: str) -> dict | None:
        return self.state.get("stages", {}).get(stage)

    def _mark(self, stage: str, **facts: Any) -> None:
        if not self.config.dry_run:
            self.state.setdefault("stages", {})[stage] = {"at": time.strftime("%Y-%m-%dT%H:%M:%S"), **facts}
            _save_state(self.config.dir, self.state)

    def _unchanged_since(self, stage: str) -> bool:
        done = self._done(stage)
        return bool(done) and self.model_path.exists() and done.get("fingerprint") == _fingerprint(self.model_path)

    # 1
    def _stage_doctor(self) -> tuple[str, str]:
        from ..doctor.checks import evaluate, fp8_mode_available, gather_facts

        facts = gather_facts()
        report = evaluate(facts, model=self.config.model)
        ignore = {"disk"} | (set() if self.source == "git" else {"git", "git-lfs"})
        blocking = [c for c in report.checks if c.status == "fail" and c.name not in ignore]
        if self.config.precision == "fp8-compute" and fp8_mode_available(facts) != "compute":
            raise SetupStageFailed("doctor", "fp8-compute asked for, but this machine can only do FP8 storage "
                                   f"({report.by_name('fp8 compute').value})",
                                   fix="use --precision auto or fp8-storage, or run on an Ada/Hopper GPU")
        if blocking:
            raise SetupStageFailed("doctor", "; ".join(f"{c.name}: {c.value}" for c in blocking),
                                   fix=" / ".join(c.fix for c in blocking))
        warns = sum(c.status == "warn" for c in report.checks)
        return "ok", f"{len(report.checks)} checks, {warns} warnings; FP8 here: {fp8_mode_available(facts)}"

    # 2
    def _stage_disk(self) -> tuple[str, str]:
        from ..display import human_bytes
        from ..weights.hub import check_disk, plan_download

        if self.source in ("local", "comfy-file", "embedded"):
            return "skipped", f"{'shipped in the package' if self.source == 'embedded' else 'local source'}: " \
                              "nothing to download"
        if self._unchanged_since("verify"):
            return "skipped", "already downloaded and verified"
        if self.source == "tiny":
            return "ok", "a few MB for the tiny model"
        if self.source == "hub":
            plan = plan_download(self.config.model, include=self.config.include or _hub_include(),
                                 local_dir=self.model_path, free_bytes=self.config.free_bytes)
            self.state["revision"] = plan.commit
            return "ok", f"{human_bytes(plan.total_bytes)} in {len(plan.files)} files → {self.model_path}; " \
                         f"{human_bytes(plan.free_bytes)} free"
        # git: clone the pointers (a few KB) to learn the real sizes; a dry run clones into a temp folder
        if self.config.dry_run:
            with tempfile.TemporaryDirectory() as tmp:
                total, n = _pointer_sizes(_clone_pointers(self.config.model, Path(tmp) / "repo"))
            return "planned", f"would clone {self.config.model} → {self.model_path}, then fetch " \
                              f"{n} LFS files, {human_bytes(total)}"
        if not (self.model_path / ".git").is_dir():
            _clone_pointers(self.config.model, self.model_path)
        total, n = _pointer_sizes(self.model_path)
        free = check_disk(int(total * DISK_SAFETY_FACTOR), self.config.dir, self.config.free_bytes)
        return "ok", f"{n} LFS files still to fetch, {human_bytes(total)}; {human_bytes(free)} free"

    # 3
    def _stage_fetch(self) -> tuple[str, str]:
        if self.source in ("local", "comfy-file", "embedded"):
            return "skipped", f"local source: using {self.model_path} in place"
        if self._unchanged_since("verify"):
            return "skipped", f"{len(self._done('verify')['fingerprint'])} weight files already fetched"
        if self.config.dry_run:
            return "planned", f"would fetch into {self.model_path}"
        if self.source == "tiny":
            from ..pipeline.tiny import save_tiny_model

            info = save_tiny_model(self.model_path)
            return "ok", str(info)
        if self.source == "hub":
            from ..weights.hub import download

            result = download(self.config.model, include=self.config.include or _hub_include(),
                              local_dir=self.model_path, verify=False, echo=self.echo)
            return "ok", f"{len(result.plan.files)} files in {result.seconds:.1f} s"
        from ..weights.lfs import pull

        restored = _restore_deleted(self.model_path)
        files = pull(self.model_path)
        self.state["revision"] = _git_head(self.model_path)
        extra = f"; restored {len(restored)} deleted file(s)" if restored else ""
        return "ok", f"git lfs pull: {sum(f.checked_out for f in files)}/{len(files)} LFS files present{extra}"

    # 4
    def _stage_verify(self) -> tuple[str, str]:
        if self.config.dry_run:
            return "planned", "would check headers and sha256 of every weight file"
        if self._unchanged_since("verify"):
            return "skipped", f"{len(self._done('verify')['fingerprint'])} weight files unchanged since verified"
        hashes = self._verify_files()
        self.state["files"] = hashes
        self._mark("verify", fingerprint=_fingerprint(self.model_path))
        return "ok", f"{len(hashes)} weight files: headers valid, sha256 " \
                     f"{'checked against the expected sums' if self.state.get('expected') else 'recorded'}"

    def _verify_files(self) -> dict[str, str]:
        from ..weights.lfs import lfs_oids, sha256_file
        from ..weights.verify import (
            MANIFEST_NAME,
            VerifyConfig,
            read_manifest,
            read_safetensors_header,
            verify_model,
        )

        path = self.model_path
        if self.source == "comfy-file":
            try:
                read_safetensors_header(path)
            except ValueError as exc:
                raise SetupStageFailed("verify", f"{path.name}: {exc}", fix="download the file again") from exc
            return {path.name: sha256_file(path)}
        report = verify_model(path, VerifyConfig(check_hashes=False))  # structure + headers: cheap
        if not report.ok:
            raise SetupStageFailed("verify", "; ".join(f"{p.file}: {p.what}" for p in report.problems),
                                   fix=f"{report.problems[0].fix}; then run the same `sd35fp8 setup` again")
        expected = lfs_oids(path)
        if (path / MANIFEST_NAME).is_file():
            expected.update(read_manifest(path / MANIFEST_NAME))
        self.state["expected"] = bool(expected)
        verified_before = (self._done("verify") or {}).get("fingerprint", {})
        known = self.state.get("files", {})
        hashes = {}
        for rel, fp in _fingerprint(path).items():  # hash only files that changed since they were last verified
            unchanged = verified_before.get(rel) == fp and rel in known
            hashes[rel] = known[rel] if unchanged else sha256_file(path / rel)
            if rel in expected and hashes[rel] != expected[rel]:
                raise SetupStageFailed("verify", f"{rel}: sha256 {hashes[rel][:12]}… differs from the expected "
                                       f"{expected[rel][:12]}… (corrupt or changed)",
                                       fix=f"delete {path / rel} and run the same `sd35fp8 setup` again "
                                           "(it fetches the file again)")
        return hashes

    # 5 + 6
    def _smoke_key(self) -> dict[str, Any]:
        from ..versions import library_versions

        return {"precision": self.config.precision, "fingerprint": _fingerprint(self.model_path),
                "versions": library_versions()}

    def _stage_load(self) -> tuple[str, str]:
        if self.config.dry_run:
            return "planned", f"would load {self.model_path} with precision {self.config.precision}"
        done = self._done("smoke")
        if done and done.get("key") == self._smoke_key() and (self.config.dir / SMOKE_IMAGE).is_file():
            return "skipped", "smoke image for these files, precision and versions already made"
        self.pipe, self.precision, detail = load_with_precision(self.model_path, self.source, self.config)
        self.state["precision_used"] = detail
        return "ok", detail

    def _stage_smoke(self) -> tuple[str, str]:
        from ..pipeline.generation import GenerationSettings, generate, native_size, pipeline_limits

        image = self.config.dir / SMOKE_IMAGE
        if self.config.dry_run:
            return "planned", f"would generate one small image → {image}"
        if self.pipe is None:  # load was skipped: the image is valid
            return "skipped", f"{image} (pixels sha256 {self._done('smoke')['image_sha256'][:12]}…)"
        from ..pipeline.defaults import model_defaults

        d = model_defaults(self.pipe)  # the model's own guidance (Large Turbo: 0, no CFG)
        scene = d.max_sequence_length is not None  # a trained scene model: its own recipe, and a judge to read it
        if scene:
            prompt, steps, side = SCENE_SMOKE_PROMPT, d.steps, min(d.height, d.width)
        else:  # a real-size model: small and few steps — a smoke test, not a render
            prompt, steps = "a photo of an astronaut riding a horse on the moon", min(4, d.steps)
            side = min(native_size(self.pipe), 512, pipeline_limits(self.pipe)[1])
        result = generate(self.pipe, GenerationSettings(prompt, seed=0, steps=steps, guidance_scale=d.guidance_scale,
                                                        height=side, width=side), progress=False,
                          precision=self.precision)
        result.model = self.config.model
        result.save(image)
        digest = image_sha256(image)
        self._mark("smoke", key=self._smoke_key(), image_sha256=digest)
        reading = ""
        if scene:  # what the judge saw: the model's own mistakes are reported, not failed on
            from ..scenes.judge import judge
            from ..scenes.parse import read_prompt

            reading = f"; judge: {judge(result.image, read_prompt(prompt)).summary()}"
        return "ok", (f"{side}x{side}, {result.settings.steps} steps, guidance {result.settings.guidance_scale:g} in "
                      f"{result.seconds:.1f} s → {image} (pixels sha256 {digest[:12]}…){reading}")

    def _stage_summary(self) -> tuple[str, str]:
        self.result.model_path = self.model_path
        self.result.image = self.config.dir / SMOKE_IMAGE if not self.config.dry_run else None
        if self.config.dry_run:
            return "planned", "dry run: nothing was written"
        return "ok", f"ready: sd35fp8 generate --model {self.model_path} --prompt \"…\"   " \
                     f"(report: sd35fp8 report --dir {self.config.dir})"

    def run(self) -> SetupResult:
        for i, stage in enumerate(STAGES, 1):
            start = time.perf_counter()
            try:
                status, detail = getattr(self, f"_stage_{stage}")()
                result = StageResult(stage, status, detail, time.perf_counter() - start)
            except Sd35fp8Error as exc:
                message = str(exc).split("\n  fix: ")[0].replace(f"stage {stage!r} failed: ", "")
                result = StageResult(stage, "failed", message, time.perf_counter() - start, exc.fix)
            except Exception as exc:  # anything else still ends as this stage's failure, with a fix, not a traceback
                message = " ".join(f"{type(exc).__name__}: {exc}".split())[:500]
                result = StageResult(stage, "failed", message, time.perf_counter() - start, _UNEXPECTED_FIX[stage])
            self.result.stages.append(result)
            self.echo(result.line(i))
            if result.status == "failed":
                break
        return self.result


def run_setup(config: SetupConfig, *, echo: Callable[[str], None] = print) -> SetupResult:
    """Run every stage (see the module docstring); never raises for a failing stage — check ``exit_code``.

    Example:
        >>> import tempfile
        >>> result = run_setup(SetupConfig("tiny", tempfile.mkdtemp(), precision="fp8-storage"), echo=lambda _: None)
        >>> [s.status for s in result.stages], result.exit_code
        (['ok', 'ok', 'ok', 'ok', 'ok', 'ok', 'ok'], 0)
    """
    try:
        run = _Run(config, echo)
    except SetupStageFailed as exc:  # the model spec itself is unusable: report it as the doctor stage
        failed = StageResult("doctor", "failed", str(exc).split("\n  fix: ")[0], fix=exc.fix)
        echo(failed.line(1))
        return SetupResult(config, "local", [failed])
    return run.run()


# --- helpers -----------------------------------------------------------------------------------------------

def _hub_include() -> list[str]:
    from ..weights.hub import DIFFUSERS_INCLUDE

    return list(DIFFUSERS_INCLUDE)


def _clone_pointers(url: str, dest: Path) -> Path:
    from ..weights.lfs import clone

    return clone(url, dest, skip_smudge=True)


def _pointer_sizes(repo: Path) -> tuple[int, int]:
    from ..weights.lfs import find_pointers

    pointers = find_pointers(repo)
    return sum(p.pointer.size for p in pointers), len(pointers)


def _git(repo: Path, *args: str, env: dict[str, str] | None = None) -> str:
    out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    if out.returncode:
        raise SetupStageFailed("fetch", f"git {' '.join(args)}: {out.stderr.strip()}",
                               fix=f"inspect the clone with `git -C {repo} status`")
    return out.stdout


def _git_head(repo: Path) -> str:
    return _git(repo, "rev-parse", "HEAD").strip()


def _restore_deleted(repo: Path) -> list[str]:
    """Files the user deleted (e.g. a corrupt weight file, as the verify fix says) come back as pointers."""
    deleted = [p for p in _git(repo, "ls-files", "--deleted").splitlines() if p]
    if deleted:  # as pointers (no download during checkout); the `git lfs pull` that follows fetches them
        _git(repo, "checkout", "--", *deleted, env={"GIT_LFS_SKIP_SMUDGE": "1"})
    return deleted


def load_with_precision(path: Path, source: SourceKind, config: SetupConfig):
    """Load the verified model and apply the precision.

    Returns (pipe, precision name as ``sd35fp8 generate --precision`` takes it, one line with bytes per component).
    """
    from ..display import human_bytes

    if source == "comfy-file":
        from ..precision.comfy import load_comfy_pipeline

        pipe = load_comfy_pipeline(path, base=config.base, device=config.device)
        return pipe, "fp8-storage", "Comfy scaled-FP8 file, scales applied (FP8 storage)"
    from ..pipeline.loading import load_pipeline

    if config.precision == "bf16":
        import torch

        pipe = load_pipeline(str(path), device=config.device, dtype=torch.bfloat16)
        weights = sum(p.numel() * p.element_size() for p in pipe.transformer.parameters())
        return pipe, "bf16", f"bf16, no FP8 (transformer {human_bytes(weights)})"
    from ..precision.quantize import apply_precision_

    pipe = load_pipeline(str(path), device=config.device)
    report = apply_precision_(pipe, config.precision)
    return pipe, f"fp8-{report.mode}", f"FP8 {report.mode} ({report.policy}); " + _bytes_line(report)


def _bytes_line(report) -> str:
    from ..display import human_bytes

    parts = [f"{c.name} {human_bytes(c.before)}→{human_bytes(c.after)}" for c in report.components
             if c.before != c.after]
    return ", ".join(parts) or "no bytes changed"

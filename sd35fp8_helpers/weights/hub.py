"""Downloading SD3.5 from the Hugging Face hub: checked before, translated when it fails, verified after.

``huggingface_hub`` does the transfer (HTTP or hf_xet, as it chooses, resuming ``.incomplete`` files);
this module adds what users lose hours to:

* **Disk preflight** — the repository's file sizes are listed first and the download is refused with
  "needs X GB, Y GB free at PATH" before the first byte, instead of dying at 90 %.
* **One-line errors** — gated repo, 401, 403, 404 and offline are translated into typed errors that say
  what to do: accept the licence on the model page, set a token, check the name, unset ``HF_HUB_OFFLINE``.
* **The token** comes from ``HF_TOKEN`` or ``hf auth login`` and is never printed: we only ever say whether one
  is configured.
* **Nothing half-written** — ``--local-dir`` downloads land in a staging folder beside the destination and
  are moved in only when complete and verified (re-running resumes from the staging folder). Cache
  downloads rely on the hub's own ``.incomplete`` files: a snapshot only links complete blobs.
* **Verified** — the result goes through :func:`~sd35fp8_helpers.weights.verify.verify_model`, with the sha256 of
  every LFS file taken from the hub's file listing (written to ``sha256sums.txt`` for ``--local-dir``).

Where downloads land: ``HF_HUB_CACHE`` (default ``$HF_HOME/hub`` = ``~/.cache/huggingface/hub``). Set
``HF_HOME`` or ``HF_HUB_CACHE`` *before* Python starts (the hub library reads them at import), to a fast local
SSD with room for the model; ``TRANSFORMERS_CACHE`` is deprecated.

Example:
    >>> download("stabilityai/stable-diffusion-3.5-medium", include=DIFFUSERS_INCLUDE)   # doctest: +SKIP
    DownloadResult(repo_id='stabilityai/stable-diffusion-3.5-medium', ...)
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..constants import DISK_SAFETY_FACTOR, settings
from ..doctor.checks import _existing_parent
from ..errors import (
    GatedRepo,
    HubAuthFailed,
    HubError,
    HubOffline,
    ModelVerificationFailed,
    NotEnoughDisk,
    RepoNotOnHub,
)
from ..vocabulary import check_repo_id

DIFFUSERS_INCLUDE: tuple[str, ...] = ("model_index.json", "*/*.json", "*/*.txt", "*/*.model", "*/*.safetensors")
"""A diffusers pipeline without its extras: configs, tokenizers and safetensors weights — never pickle weights,
never the all-in-one single-file checkpoint that SD3.5 repos also carry at their root (another 16 GB)."""

STAGING_SUFFIX = ".partial"
"""``--local-dir DIR`` downloads into ``.DIR.partial`` beside it, then moves the files into ``DIR``."""

if TYPE_CHECKING:  # pragma: no cover
    from .verify import VerifyReport

GB = 10**9


@dataclass(frozen=True)
class KnownSource:
    """A real place SD3.5 weights come from. ``files``: path -> size in bytes (approximate, as published)."""

    repo_id: str
    layout: str
    gated: bool | None  # None: not recorded here — the model page says
    what: str
    files: dict[str, int] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.repo_id}"


KNOWN_SOURCES: tuple[KnownSource, ...] = (
    KnownSource("stabilityai/stable-diffusion-3.5-large", "diffusers", True,
                "SD3.5 Large (8.1B transformer), bf16; sd35fp8 quantises it to FP8 on load"),
    KnownSource("stabilityai/stable-diffusion-3.5-large-turbo", "diffusers", True,
                "Large distilled for 4 steps, same architecture"),
    KnownSource("stabilityai/stable-diffusion-3.5-medium", "diffusers", True,
                "SD3.5 Medium (2.5B transformer), bf16"),
    KnownSource("Comfy-Org/stable-diffusion-3.5-fp8", "single files", None,
                "the real FP8 files: 'scaled FP8' single-file checkpoints (ComfyUI format)", {
                    "sd3.5_large_fp8_scaled.safetensors": int(14.9 * GB),
                    "sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors": int(11.6 * GB),
                    "text_encoders/clip_g.safetensors": int(1.39 * GB),
                    "text_encoders/clip_l.safetensors": 246 * 10**6,
                    "text_encoders/t5xxl_fp16.safetensors": int(9.79 * GB),
                    "text_encoders/t5xxl_fp8_e4m3fn.safetensors": int(4.89 * GB),
                    "text_encoders/t5xxl_fp8_e4m3fn_scaled.safetensors": int(5.16 * GB),
                }),
)
"""From shared/REFERENCE.md §1. ``stabilityai/stable-diffusion-3.5-fp8`` is *not* here: it does not exist
(see :data:`~sd35fp8_helpers.vocabulary.NONEXISTENT_REPOS`)."""


def known_sources() -> list[dict]:
    """The known sources as table rows (notebook 01), the non-existent repo included with what to use."""
    from ..display import human_bytes
    from ..vocabulary import NONEXISTENT_REPOS

    rows = [{"repo": s.repo_id, "layout": s.layout,
             "gated": {True: "yes: accept the licence", False: "no", None: "see model page"}[s.gated],
             "what": s.what + (f" — files: {', '.join(f'{k} ({human_bytes(v)})' for k, v in s.files.items())}"
                               if s.files else "")} for s in KNOWN_SOURCES]
    rows += [{"repo": r, "layout": "—", "gated": "—", "what": "DOES NOT EXIST: " + why}
             for r, why in NONEXISTENT_REPOS.items()]
    return rows


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    sha256: str | None  # LFS files only; small git files have a sha1 blob id


@dataclass
class DownloadPlan:
    """What a download will fetch and whether it fits, decided before any file is fetched."""

    repo_id: str
    revision: str
    commit: str
    files: list[RemoteFile]
    destination: Path
    free_bytes: int
    present_bytes: int = 0  # already complete at the destination (a resumed --local-dir download)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def need_bytes(self) -> int:
        """Bytes still to fetch, times :data:`~sd35fp8_helpers.constants.DISK_SAFETY_FACTOR`."""
        return int((self.total_bytes - self.present_bytes) * DISK_SAFETY_FACTOR)

    @property
    def fits(self) -> bool:
        return self.free_bytes >= self.need_bytes

    def __str__(self) -> str:
        from ..display import human_bytes

        return (f"{self.repo_id}@{self.commit[:10]}: {len(self.files)} files, {human_bytes(self.total_bytes)}; "
                f"needs {human_bytes(self.need_bytes)}, {human_bytes(self.free_bytes)} free at {self.destination}")


@dataclass
class DownloadResult:
    repo_id: str
    path: Path
    plan: DownloadPlan | None  # None: the hub was unreachable and a complete cached snapshot was used
    seconds: float
    report: VerifyReport

    def __str__(self) -> str:
        how = f"in {self.seconds:.1f} s" if self.plan else "from the cache (hub unreachable)"
        return f"{self.path} {how}; {self.report.summary()}"


# --- errors: the hub's exceptions, translated ---------------------------------------------------------

def _token_configured() -> bool:
    if settings().token_in_env:
        return True
    try:
        from huggingface_hub import get_token

        return bool(get_token())
    except Exception:  # an unreadable token file counts as none
        return False


def _page(repo_id: str) -> str:
    from huggingface_hub import constants

    return f"{constants.ENDPOINT}/{repo_id}"


_SET_TOKEN = "create a read token at https://huggingface.co/settings/tokens, then `hf auth login` or export HF_TOKEN"


def _gated_without_token(repo_id: str) -> GatedRepo:
    return GatedRepo(repo_id, "is gated: downloads need an account that accepted its licence, and a token",
                     fix=f"accept the licence at {_page(repo_id)}, then {_SET_TOKEN}")


def translate_hub_error(exc: BaseException, repo_id: str, revision: str | None = None) -> HubError | None:
    """The typed sd35fp8 error for a ``huggingface_hub`` / ``httpx`` exception, or ``None`` if it is not one."""
    from huggingface_hub import errors as hf

    token = _token_configured()
    if isinstance(exc, hf.GatedRepoError):
        if token:
            return GatedRepo(repo_id, "is gated and this token's account has not been granted access",
                             fix=f"open {_page(repo_id)} logged in as that account, accept the licence, "
                                 "wait for approval, then retry")
        return _gated_without_token(repo_id)
    if isinstance(exc, hf.RevisionNotFoundError):
        return RepoNotOnHub(repo_id, f"revision {revision!r} not found",
                            fix=f"check --revision: a branch, tag or commit listed at {_page(repo_id)}/tree/main")
    if isinstance(exc, hf.RepositoryNotFoundError):
        if token:
            return RepoNotOnHub(repo_id, "not found on the hub (or private, and this token cannot see it)",
                                fix=f"check the name (owner/name, case matters) at {_page(repo_id)}")
        return RepoNotOnHub(repo_id, "not found on the hub (or private/gated, and no token is set)",
                            fix=f"check the name (owner/name, case matters) at {_page(repo_id)}; "
                                f"if it is private or gated, {_SET_TOKEN}")
    if isinstance(exc, hf.RemoteEntryNotFoundError):
        return RepoNotOnHub(repo_id, "a requested file is not in the repository",
                            fix=f"check --include against the files listed at {_page(repo_id)}/tree/main")
    if isinstance(exc, hf.OfflineModeIsEnabled) or (isinstance(exc, hf.LocalEntryNotFoundError)
                                                    and settings().hub_offline):
        return HubOffline(repo_id, "HF_HUB_OFFLINE=1 forbids network access",
                          fix="unset HF_HUB_OFFLINE (or export HF_HUB_OFFLINE=0) on a machine with network, "
                              "or pass a local folder that holds the model")
    if isinstance(exc, hf.HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status == 401:
            return HubAuthFailed(repo_id, "the hub rejected the token (401: invalid or expired)",
                                 fix=f"{_SET_TOKEN} (replacing the old one)")
        if status == 403:
            return HubAuthFailed(repo_id, "the token is not allowed to read this repository (403)",
                                 fix="for a fine-grained token, enable 'read access to public gated repos' "
                                     "(or to this repo) at https://huggingface.co/settings/tokens")
        if status >= 500:
            return HubOffline(repo_id, f"the hub answered {status} (a server-side problem)",
                              fix="retry in a few minutes: finished files are kept and partial ones resume")
    import httpx2

    if isinstance(exc, (httpx2.TransportError, hf.LocalEntryNotFoundError, ConnectionError)):
        from huggingface_hub import constants

        return HubOffline(repo_id, f"cannot reach {constants.ENDPOINT} ({type(exc).__name__})",
                          fix="check the network or proxy (HTTPS_PROXY) and HF_ENDPOINT, then run the same command "
                              "again: it resumes; or pass a local folder that holds the model")
    return None


def _call(repo_id: str, revision: str | None, fn, /, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        translated = translate_hub_error(exc, repo_id, revision)
        if translated is None:
            raise
        raise translated from exc


# --- preflight ----------------------------------------------------------------------------------------

def check_disk(need_bytes: int, path: str | os.PathLike, free_bytes: int | None = None) -> int:
    """Raise :class:`NotEnoughDisk` unless ``need_bytes`` fit at ``path``; returns the free bytes.

    ``free_bytes`` overrides the measured figure (tests; "what if I only had 10 GB?").
    """
    path = Path(path)
    free = shutil.disk_usage(_existing_parent(path)).free if free_bytes is None else free_bytes
    if free < need_bytes:
        raise NotEnoughDisk(path, need_bytes, free)
    return free


def plan_download(repo_id: str, *, include: Sequence[str] | None = None, revision: str | None = None,
                  local_dir: str | os.PathLike | None = None, free_bytes: int | None = None) -> DownloadPlan:
    """Ask the hub what ``include`` selects and how big it is; refuse if it cannot fit. No file is fetched.

    Raises :class:`NotEnoughDisk`, or the typed hub errors (gated, not found, offline …).
    """
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile
    from huggingface_hub.utils import filter_repo_objects

    check_repo_id(repo_id)
    revision = revision or "main"
    api = HfApi()
    info = _call(repo_id, revision, api.model_info, repo_id, revision=revision)
    if info.gated and not _token_configured():  # the files would answer 401: say why before trying
        raise _gated_without_token(repo_id)
    tree = _call(repo_id, revision, lambda: list(api.list_repo_tree(repo_id, revision=info.sha, recursive=True)))
    files = [RemoteFile(f.path, f.size, f.lfs.sha256 if f.lfs else None) for f in tree if isinstance(f, RepoFile)]
    selected = set(filter_repo_objects([f.path for f in files], allow_patterns=list(include) if include else None))
    files = [f for f in files if f.path in selected]
    if not files:
        raise RepoNotOnHub(repo_id, f"no file matches --include {' '.join(include or [])}",
                           fix=f"check the patterns against the files listed at {_page(repo_id)}/tree/main")
    destination = Path(local_dir).absolute() if local_dir else settings().hf_hub_cache
    present = sum(f.size for f in files if local_dir and (destination / f.path).is_file()
                  and (destination / f.path).stat().st_size == f.size)
    plan = DownloadPlan(repo_id, revision, info.sha, files, destination, 0, present)
    plan.free_bytes = check_disk(plan.need_bytes, destination, free_bytes)
    return plan


# --- the download -------------------------------------------------------------------------------------

def _staging_dir(local_dir: Path) -> Path:
    return local_dir.parent / f".{local_dir.name}{STAGING_SUFFIX}"


def _move_into(staging: Path, dest: Path) -> None:
    """Move a complete staging folder's files into ``dest`` (one rename each: no half-written file)."""
    if not dest.exists() or (dest.is_dir() and not any(dest.iterdir())):
        if dest.exists():
            dest.rmdir()
        staging.rename(dest)
        return
    for src in sorted(p for p in staging.rglob("*") if p.is_file()):
        target = dest / src.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, target)
    shutil.rmtree(staging)


def download(repo_id: str, *, include: Sequence[str] | None = None, revision: str | None = None,
             local_dir: str | os.PathLike | None = None, free_bytes: int | None = None,
             verify: bool = True, echo: Callable[[str], None] = lambda line: None,
             supplied: Sequence[str] = ()) -> DownloadResult:
    """Download (part of) a hub repo after a disk preflight; verify it; return where it is.

    Without ``local_dir`` files land in the hub cache (``HF_HUB_CACHE``) and the returned path is the
    snapshot folder. With ``local_dir`` they land there as plain files, plus ``sha256sums.txt``.
    ``include`` takes the hub's glob patterns (``"text_encoders/*"``, ``"*.json"``). Interrupted downloads
    resume when run again. ``verify`` hashes every LFS file against the hub's sha256 (slow for 15 GB).
    ``echo`` receives the plan line before the transfer starts (the CLI prints it).
    ``supplied``: components the caller provides itself (a Comfy file's transformer), whose weights ``include``
    leaves out on purpose: verification does not count them as missing.
    """
    from huggingface_hub import snapshot_download

    from .verify import VerifyConfig, verify_model, write_manifest

    start = time.perf_counter()
    try:
        plan = plan_download(repo_id, include=include, revision=revision, local_dir=local_dir,
                             free_bytes=free_bytes)
    except HubOffline as offline:  # offline, but maybe downloaded before: the hub's cache answers without network
        if local_dir:
            raise
        try:
            path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=include, local_files_only=True))
        except Exception:
            raise offline from offline.__cause__  # not cached either: the error that names the fix
        report = verify_model(path, VerifyConfig(check_hashes=False, supplied=tuple(supplied)))
        if not report.ok:
            raise ModelVerificationFailed(path, report.problems) from None
        return DownloadResult(repo_id, path, None, time.perf_counter() - start, report)
    echo(f"plan: {plan}")
    paths = [f.path for f in plan.files]
    expected = {f.path: f.sha256 for f in plan.files if f.sha256}
    target = _staging_dir(plan.destination) if local_dir else None
    # The revision by name (not plan.commit), so the hub records refs/<revision> and an offline run finds it.
    path = Path(_call(repo_id, revision, snapshot_download, repo_id, revision=plan.revision, allow_patterns=paths,
                      local_dir=target))
    report = verify_model(path, VerifyConfig(check_hashes=verify, use_git_lfs=False, expected_sha256=expected,
                                             supplied=tuple(supplied)))
    if not report.ok:
        raise ModelVerificationFailed(path, report.problems)
    if target is not None:
        write_manifest(target, expected)
        _move_into(target, plan.destination)
        path = plan.destination
        report.path = path
    return DownloadResult(repo_id, path, plan, time.perf_counter() - start, report)


def disk_fit_rows(path: str | os.PathLike | None = None, free_bytes: int | None = None) -> list[dict]:
    """What fits at ``path`` (default: the hub cache): each known download against the free space there.

    Diffusers-layout sizes are computed from the architectures' parameter counts (bf16, as distributed);
    single files use the published sizes. Each need includes the
    :data:`~sd35fp8_helpers.constants.DISK_SAFETY_FACTOR` margin the preflight asks for.
    """
    from ..display import human_bytes
    from ..presets import model_bytes

    path = Path(path) if path else settings().hf_hub_cache
    free = shutil.disk_usage(_existing_parent(path)).free if free_bytes is None else free_bytes
    needs = {f"stabilityai/stable-diffusion-3.5-{p} (diffusers, bf16)": model_bytes(p) for p in ("large", "medium")}
    fp8 = next(s for s in KNOWN_SOURCES if s.layout == "single files")
    needs.update({f"{fp8.repo_id}: {name}": size for name, size in fp8.files.items() if "/" not in name})
    rows = []
    for what, size in needs.items():
        need = int(size * DISK_SAFETY_FACTOR)
        rows.append({"download": what, "needs": human_bytes(need), "free there": human_bytes(free),
                     "fits": "yes" if free >= need else "NO"})
    return rows


def cache_settings() -> list[dict]:
    """Where hub downloads go and which variables decide it (table rows for notebook 01)."""
    s = settings()
    return [
        {"variable": "HF_HOME", "value": str(s.hf_home), "meaning": "root of the hub's files (token, cache)"},
        {"variable": "HF_HUB_CACHE", "value": str(s.hf_hub_cache),
         "meaning": "where downloads land; put it on a fast local SSD with room for the model"},
        {"variable": "TRANSFORMERS_CACHE", "value": s.transformers_cache or "(unset)",
         "meaning": "deprecated: use HF_HUB_CACHE"},
        {"variable": "HF_HUB_OFFLINE", "value": "1" if s.hub_offline else "(unset)",
         "meaning": "1 = never touch the network (cache only)"},
        {"variable": "HF_TOKEN", "value": "(set)" if s.token_in_env else "(unset)",
         "meaning": "token for gated repos; its value is never shown"},
    ]

"""Git LFS, made visible: pointer files, checksums, and thin wrappers around the real ``git lfs`` commands.

Model repositories on the hub are git repositories whose large files live in Git LFS. Git itself only
stores a small text *pointer* per file::

    version https://git-lfs.github.com/spec/v1
    oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393
    size 12345

and the ``git-lfs`` filter swaps pointers for contents at checkout. Clone without git-lfs installed (or
with ``GIT_LFS_SKIP_SMUDGE=1``) and every ``.safetensors`` file is one of these ~130-byte pointers; loading
it fails much later with ``Error while deserializing header: header too large`` (safetensors reads the
first 8 bytes, ``"version "``, as a little-endian header length of about 2.3 exabytes).

This module finds pointers anywhere in a folder (:func:`find_pointers`), hashes files in a streaming way
with a progress bar (:func:`sha256_file`), and runs the real commands: :func:`clone` (optionally without
smudge, to fetch only what you need), :func:`pull` (``git lfs pull --include …``) and :func:`ls_files`.
``git lfs`` over ``file://`` uses its built-in standalone transfer agent, so a local repository works as
a remote with no server (that is what notebook 01 and the tests do).

Example:
    >>> from sd35fp8_helpers.weights.lfs import parse_pointer
    >>> parse_pointer(b"version https://git-lfs.github.com/spec/v1\\noid sha256:" + b"0" * 64 + b"\\nsize 7\\n").size
    7
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import GitCommandFailed, GitLfsMissing

POINTER_MAX_BYTES = 1024
"""The spec caps pointer files at 1024 bytes; anything larger is content, never a pointer."""

POINTER_VERSIONS = ("https://git-lfs.github.com/spec/v1", "https://hawser.github.com/spec/v1")
"""The current spec URL and the pre-release one git-lfs still accepts."""

HASH_CHUNK_BYTES = 8 * 2**20
HASH_PROGRESS_MIN_BYTES = 64 * 2**20
"""Files at least this large get a progress bar while hashed (a 15 GB checkpoint takes about a minute)."""

LFS_CONFIG = ("-c", "filter.lfs.smudge=git-lfs smudge -- %f", "-c", "filter.lfs.process=git-lfs filter-process",
              "-c", "filter.lfs.clean=git-lfs clean -- %f", "-c", "filter.lfs.required=true")
"""Passed to ``git clone`` so the LFS filter runs even where ``git lfs install`` was never run."""

_OID = re.compile(r"^sha256:([0-9a-f]{64})$")


@dataclass(frozen=True)
class LfsPointer:
    """The three fields of a pointer file (spec v1). ``size`` is the real file's size in bytes."""

    oid: str  # sha256 hex of the real contents
    size: int
    version: str = POINTER_VERSIONS[0]


@dataclass(frozen=True)
class PointerFile:
    """A file on disk that is a pointer, not the content it stands for."""

    path: Path
    pointer: LfsPointer

    @property
    def pointer_bytes(self) -> int:
        return self.path.stat().st_size

    def row(self, root: Path | None = None) -> dict:
        from ..display import human_bytes

        name = self.path.relative_to(root).as_posix() if root else str(self.path)
        return {"file": name, "on disk": f"{self.pointer_bytes} B", "real size": human_bytes(self.pointer.size),
                "oid (sha256)": self.pointer.oid[:16] + "…"}


@dataclass(frozen=True)
class LfsFile:
    """One line of ``git lfs ls-files``: the path, its oid and size, and whether the content is checked out."""

    path: str
    oid: str
    size: int
    checked_out: bool


# --- pointer files ------------------------------------------------------------------------------------

def parse_pointer(data: bytes) -> LfsPointer | None:
    """Parse pointer text exactly as git-lfs writes it; ``None`` when ``data`` is not a pointer.

    Tolerated as git-lfs does: CRLF line ends, a missing final newline, extra ``ext-…`` keys. Required:
    the ``version`` line first, an ``oid sha256:<64 hex>`` and a decimal ``size``.
    """
    if len(data) > POINTER_MAX_BYTES or not data.startswith(b"version "):
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    fields: dict[str, str] = {}
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line:
            continue
        key, sep, value = line.partition(" ")
        if not sep or key in fields:
            return None
        fields[key] = value.strip()
    oid = _OID.match(fields.get("oid", ""))
    if fields.get("version") not in POINTER_VERSIONS or not oid or not fields.get("size", "").isdigit():
        return None
    return LfsPointer(oid=oid.group(1), size=int(fields["size"]), version=fields["version"])


def read_pointer(path: str | os.PathLike) -> LfsPointer | None:
    """The pointer in ``path``, or ``None`` if the file holds real content (reads at most 1 KiB)."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size > POINTER_MAX_BYTES:
        return None
    return parse_pointer(path.read_bytes())


def format_pointer(oid: str, size: int) -> str:
    """The pointer text git-lfs writes for contents with this sha256 and size."""
    return f"version {POINTER_VERSIONS[0]}\noid sha256:{oid}\nsize {size}\n"


def find_pointers(folder: str | os.PathLike) -> list[PointerFile]:
    """Every pointer file under ``folder`` (``.git`` skipped), sorted by path."""
    root = Path(folder)
    found = []
    for path in sorted(root.rglob("*")):
        if ".git" in path.relative_to(root).parts or path.is_symlink() and not path.exists():
            continue
        pointer = read_pointer(path) if path.is_file() else None
        if pointer:
            found.append(PointerFile(path, pointer))
    return found


# --- checksums ----------------------------------------------------------------------------------------

def sha256_file(path: str | os.PathLike, *, progress: bool | None = None) -> str:
    """sha256 of a file, streamed in 8 MiB chunks (constant memory); a tqdm bar for files >= 64 MiB.

    ``progress=None`` decides by size; ``True``/``False`` force it.
    """
    path = Path(path)
    size = path.stat().st_size
    show = size >= HASH_PROGRESS_MIN_BYTES if progress is None else progress
    digest = hashlib.sha256()
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=size, unit="B", unit_scale=True, desc=f"sha256 {path.name}", leave=False)
    try:
        with path.open("rb") as f:
            while chunk := f.read(HASH_CHUNK_BYTES):
                digest.update(chunk)
                if bar is not None:
                    bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    return digest.hexdigest()


# --- the git-lfs program ------------------------------------------------------------------------------

def install_command(system: str | None = None, os_release: str | None = None) -> str:
    """The command that installs git-lfs here: apt / dnf / yum / zypper / pacman / brew / winget.

    ``system`` and ``os_release`` default to this machine (``platform.system()``, ``/etc/os-release``).
    """
    system = system or platform.system()
    if system == "Darwin":
        return "brew install git-lfs && git lfs install"
    if system == "Windows":
        return "winget install GitHub.GitLFS && git lfs install (or reinstall Git for Windows with LFS ticked)"
    if os_release is None:
        try:
            os_release = Path("/etc/os-release").read_text()
        except OSError:
            os_release = ""
    ids = set()
    for line in os_release.splitlines():
        key, _, value = line.partition("=")
        if key in ("ID", "ID_LIKE"):
            ids.update(value.strip().strip('"').lower().split())
    for family, command in (({"debian", "ubuntu"}, "sudo apt-get install git-lfs"),
                            ({"fedora", "rhel", "centos"}, "sudo dnf install git-lfs"),
                            ({"suse", "opensuse"}, "sudo zypper install git-lfs"),
                            ({"arch"}, "sudo pacman -S git-lfs"),
                            ({"alpine"}, "sudo apk add git-lfs")):
        if ids & family:
            return f"{command} && git lfs install"
    return "install git-lfs from https://git-lfs.com, then run: git lfs install"


def _git_missing() -> GitLfsMissing:
    return GitLfsMissing("git", install_command().replace("git-lfs", "git git-lfs", 1))


def git_lfs_version() -> str:
    """``git-lfs/3.3.0 …``; raises :class:`GitLfsMissing` (with the install command) when absent."""
    if shutil.which("git") is None:
        raise _git_missing()
    try:
        out = subprocess.run(["git", "lfs", "version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        out = None
    if out is None or out.returncode != 0 or not out.stdout.startswith("git-lfs/"):
        raise GitLfsMissing("git-lfs", install_command())
    return out.stdout.strip()


def _git(args: Sequence[str], cwd: Path | None = None, env: dict[str, str] | None = None,
         fix: str = "") -> str:
    command = ["git", *args]
    try:
        out = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    except FileNotFoundError as exc:
        raise _git_missing() from exc
    if out.returncode != 0:
        shown = ["git", *(a for a in args if a not in LFS_CONFIG)]  # the -c filter settings are noise
        raise GitCommandFailed(shown, out.returncode, out.stderr, fix=fix)
    return out.stdout


def clone(url: str, dest: str | os.PathLike, *, skip_smudge: bool = True, revision: str | None = None) -> Path:
    """``git clone URL DEST``; with ``skip_smudge`` (the default) LFS files stay pointers.

    Cloning without smudge (``GIT_LFS_SKIP_SMUDGE=1``) is the fast, safe way to get a model repo: you see
    every file and its real size, then :func:`pull` only what you need. git removes ``dest`` if the
    clone fails, so no half-cloned folder is left behind.
    """
    git_lfs_version()
    dest = Path(dest)
    args = [*LFS_CONFIG, "clone", "--quiet", *(["--branch", revision] if revision else []), str(url), str(dest)]
    _git(args, env={"GIT_LFS_SKIP_SMUDGE": "1" if skip_smudge else "0"},
         fix="check the URL and your access to it (gated hub repos: accept the licence, then use a token)")
    return dest


def pull(repo: str | os.PathLike, include: Iterable[str] | None = None) -> list[LfsFile]:
    """``git lfs pull [--include a,b]`` in ``repo``: fetch the contents and replace the pointers.

    git-lfs downloads into ``.git/lfs/tmp``, checks each object's sha256, and only then replaces the
    pointer in the working tree — so a failed pull leaves pointers, never a half-written weight file.
    Returns :func:`ls_files` afterwards.
    """
    git_lfs_version()
    repo = Path(repo)
    patterns = list(include or [])
    args = ["lfs", "pull", *(["--include", ",".join(patterns)] if patterns else [])]
    _git(args, cwd=repo, fix=f"check the remote (git -C {repo} remote -v) and your access to it, then run "
                             f"`git lfs pull` again: finished objects are kept, so it resumes")
    return ls_files(repo)


def ls_files(repo: str | os.PathLike) -> list[LfsFile]:
    """``git lfs ls-files``: every LFS file in HEAD, its oid, size, and whether it is checked out.

    Uses ``--json`` (git-lfs >= 3.2); older git-lfs (Ubuntu 22.04 ships 3.0) gets ``--long``, with each
    size read from the pointer, or from the file once it is checked out.
    """
    git_lfs_version()
    repo = Path(repo)
    try:
        data = json.loads(_git(["lfs", "ls-files", "--json"], cwd=repo) or "{}")
    except GitCommandFailed:
        files = []
        for line in _git(["lfs", "ls-files", "--long"], cwd=repo).splitlines():
            oid, mark, path = line.split(" ", 2)
            pointer = read_pointer(repo / path)
            size = pointer.size if pointer else (repo / path).stat().st_size
            files.append(LfsFile(path, oid, size, mark == "*"))
        return files
    return [LfsFile(f["name"], f["oid"], int(f["size"]), bool(f["checkout"])) for f in data.get("files") or []]


def init_lfs_repo(source: str | os.PathLike, repo: str | os.PathLike, *,
                  track: Sequence[str] = ("*.safetensors", "*.bin", "*.ckpt", "*.pt", "*.pth")) -> Path:
    """Make ``repo`` a git repository of ``source``'s files with weights in Git LFS, as on the hub.

    Used by notebook 01 and the tests to have a real LFS remote without a server (clone it by path or
    ``file://`` URL). ``repo`` must not exist yet.
    """
    git_lfs_version()
    repo = Path(repo)
    shutil.copytree(source, repo)
    env = {"GIT_AUTHOR_NAME": "sd35fp8", "GIT_AUTHOR_EMAIL": "sd35fp8@localhost",
           "GIT_COMMITTER_NAME": "sd35fp8", "GIT_COMMITTER_EMAIL": "sd35fp8@localhost"}
    _git(["init", "--quiet", "--initial-branch=main"], cwd=repo)
    _git([*LFS_CONFIG, "lfs", "track", *track], cwd=repo)
    _git([*LFS_CONFIG, "add", "--all"], cwd=repo)
    _git([*LFS_CONFIG, "commit", "--quiet", "-m", "model weights in Git LFS"], cwd=repo, env=env)
    return repo


def lfs_oids(folder: str | os.PathLike) -> dict[str, str]:
    """``{path relative to folder: sha256}`` from Git LFS, when ``folder`` is inside a git repository.

    Empty when it is not, or when git / git-lfs are unavailable: callers treat that as "no expected hash".
    """
    folder = Path(folder).absolute()
    try:
        top = Path(_git(["rev-parse", "--show-toplevel"], cwd=folder).strip())
        files = ls_files(top)
    except (GitLfsMissing, GitCommandFailed, NotADirectoryError, json.JSONDecodeError):
        return {}
    out = {}
    for f in files:
        full = top / f.path
        try:
            out[full.relative_to(folder).as_posix()] = f.oid
        except ValueError:  # outside the folder being checked
            continue
    return out


def checksum_rows(repo: str | os.PathLike) -> list[dict]:
    """Hash every checked-out LFS file in ``repo`` and compare with its oid (table rows for notebook 01)."""
    from ..display import human_bytes

    repo = Path(repo)
    rows = []
    for f in ls_files(repo):
        actual = sha256_file(repo / f.path) if f.checked_out else None
        rows.append({"file": f.path, "size": human_bytes(f.size), "oid (expected sha256)": f.oid[:16] + "…",
                     "sha256 on disk": actual[:16] + "…" if actual else "(pointer: not pulled)",
                     "match": "yes" if actual == f.oid else "NO"})
    return rows

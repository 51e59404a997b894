"""Is this model folder loadable? Checked without loading a single tensor.

A diffusers folder fails to load in ways whose messages point nowhere near the cause:
``header too large`` (the file is a Git LFS pointer), ``invalid header length`` or
``MetadataIncompleteBuffer`` (a download cut short), ``No such file`` deep inside ``from_pretrained`` (a
component folder never arrived). :func:`verify_model` finds each of these from the files alone:

* every component named in ``model_index.json`` has its folder, its config and its weights;
* every ``.safetensors`` file has a valid header — 8-byte length, UTF-8 JSON, known dtypes (FP8 included),
  every tensor's byte range inside the file and equal to shape × dtype size — which catches truncated and
  corrupt files by reading only the first few kilobytes;
* Git LFS pointer files are reported as pointers (with the real size and the ``git lfs pull`` that fixes
  them), not as "corrupt";
* pickle weights (``.bin``, ``.ckpt``, ``.pt``, ``.pth``) are flagged and never opened: unpickling runs code;
* sha256 checksums are compared where the expected value is known: a ``sha256sums.txt`` manifest in the
  folder (``sha256sum`` format, written by ``sd35fp8 download``) or the oids Git LFS records.

Hashing reads every byte (about a minute for a 15 GB checkpoint), so ``load_pipeline`` runs the cheap checks
only; ``sd35fp8 verify`` hashes too unless told ``--no-hash``.

Example:
    >>> from sd35fp8_helpers import tiny_model_path
    >>> verify_model(tiny_model_path()).ok
    True
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from ..display import human_bytes
from ..errors import ModelVerificationFailed
from .lfs import read_pointer

MANIFEST_NAME = "sha256sums.txt"
"""Checksum manifest in a model folder: ``<sha256 hex>  <relative/path>`` per line, as ``sha256sum`` writes it
(``sha256sum -c sha256sums.txt`` checks it too); ``#`` starts a comment."""

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
"""Weight formats that are Python pickles: loading one can execute arbitrary code."""

SKIPPED_DIRS = (".git", ".cache")
""".git holds LFS objects; .cache/huggingface holds the hub's download metadata for a --local-dir folder."""

SAFETENSORS_MAX_HEADER = 100_000_000
"""The safetensors library refuses headers above 100 MB ("header too large")."""

DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
"""Every dtype safetensors 0.8 writes, with its size in bits (F4/F6 are packed)."""

ProblemKind = Literal["pointer", "truncated", "corrupt", "pickle", "missing", "checksum"]


@dataclass(frozen=True)
class Problem:
    """One reason the folder will not load: which file, what is wrong, and the fix."""

    file: str
    kind: ProblemKind
    what: str
    fix: str

    def __str__(self) -> str:
        return f"{self.file}: {self.what} — fix: {self.fix}"


@dataclass(frozen=True)
class FileCheck:
    """What was found in one weight file."""

    file: str
    format: Literal["safetensors", "pointer", "pickle"]
    size: int
    tensors: int = 0
    dtypes: tuple[str, ...] = ()
    sha256: Literal["ok", "mismatch", "not checked", "unknown"] = "unknown"


@dataclass
class VerifyReport:
    """The result of :func:`verify_model`. ``ok`` means loadable; ``problems`` lists each reason it is not."""

    path: Path
    layout: Literal["diffusers", "files"]
    files: list[FileCheck] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def hashed(self) -> int:
        return sum(f.sha256 in ("ok", "mismatch") for f in self.files)

    def summary(self) -> str:
        tensors = sum(f.tensors for f in self.files)
        if self.ok:
            return (f"OK: {self.path} is loadable ({len(self.files)} weight files, {tensors} tensors, "
                    f"{self.hashed} sha256 verified)")
        return f"NOT LOADABLE: {self.path} has {len(self.problems)} problem{'s' * (len(self.problems) != 1)}"

    def to_text(self) -> str:
        lines = [str(p) for p in self.problems] + [f"note: {n}" for n in self.notes]
        return "\n".join([*lines, self.summary()])

    def to_json(self) -> str:
        data = {"ok": self.ok, **asdict(self), "path": str(self.path)}
        return json.dumps(data, indent=2)

    def _repr_html_(self) -> str:
        from html import escape

        rows = "".join(f"<tr><td>{escape(p.file)}</td><td>{escape(p.kind)}</td>"
                       f"<td style='text-align:left'>{escape(p.what)}</td>"
                       f"<td style='text-align:left'><code>{escape(p.fix)}</code></td></tr>" for p in self.problems)
        table = ("<table><thead><tr><th>file</th><th>problem</th><th>what is wrong</th><th>fix</th></tr></thead>"
                 f"<tbody>{rows}</tbody></table>") if rows else ""
        notes = "".join(f"<p>note: {escape(n)}</p>" for n in self.notes)
        colour = "#1a7f37" if self.ok else "#cf222e"
        return f"{table}{notes}<p style='color:{colour};font-weight:bold'>{escape(self.summary())}</p>"


@dataclass(frozen=True)
class VerifyConfig:
    """What :func:`verify_model` checks.

    ``check_hashes`` reads every byte of every file with a known sha256 (slow for real models, so
    ``load_pipeline`` leaves it off); ``use_git_lfs`` takes expected hashes from ``git lfs ls-files`` when the
    folder is inside a git repository; ``manifest`` is the checksum file looked for in the folder;
    ``expected_sha256`` adds known sums (relative path -> hex; the hub's file listing, for downloads).
    ``supplied`` names components the caller brings itself (a Comfy file's transformer and text encoders):
    their configs are still checked, their weight files are not expected.
    """

    check_hashes: bool = True
    use_git_lfs: bool = True
    manifest: str = MANIFEST_NAME
    expected_sha256: dict[str, str] = field(default_factory=dict)
    supplied: tuple[str, ...] = ()


class InvalidSafetensors(ValueError):
    """A header that safetensors would refuse; ``kind`` is ``truncated`` or ``corrupt``."""

    def __init__(self, kind: ProblemKind, what: str) -> None:
        self.kind = kind
        super().__init__(what)


# --- safetensors headers -----------------------------------------------------------------------------

def read_safetensors_header(path: str | os.PathLike) -> dict:
    """Validate and return a safetensors header (``{name: {dtype, shape, data_offsets}}``) — no tensor read.

    Raises :class:`InvalidSafetensors` naming the first rule broken.
    """
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InvalidSafetensors("truncated", f"truncated: {size} bytes, shorter than the 8-byte header length")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise InvalidSafetensors("truncated" if length <= SAFETENSORS_MAX_HEADER else "corrupt",
                                     f"header length {length} bytes is larger than the file ({size} bytes): "
                                     "truncated, or not a safetensors file")
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidSafetensors("corrupt", f"header is not valid JSON ({exc.__class__.__name__}: {exc})") from exc
    if not isinstance(header, dict):
        raise InvalidSafetensors("corrupt", "header is JSON but not an object of tensors")
    data_bytes = size - 8 - length
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    end_max = 0
    beyond = []
    for name, info in tensors.items():
        _check_tensor_entry(name, info)
        begin, end = info["data_offsets"]
        bits = math.prod(info["shape"]) * DTYPE_BITS[info["dtype"]]
        if end - begin != (bits + 7) // 8:
            raise InvalidSafetensors("corrupt", f"tensor {name!r} is {info['shape']} {info['dtype']} = "
                                                f"{(bits + 7) // 8} bytes, but its data_offsets span {end - begin}")
        if end > data_bytes:
            beyond.append(name)
        end_max = max(end_max, end)
    if beyond:
        raise InvalidSafetensors("truncated", f"truncated: tensors need {end_max} bytes of data, the file holds "
                                              f"{data_bytes} ({len(beyond)} of {len(tensors)} tensors, e.g. "
                                              f"{beyond[0]!r}, lie beyond the end)")
    if end_max != data_bytes:
        raise InvalidSafetensors("corrupt", f"{data_bytes - end_max} bytes after the last tensor: "
                                            "safetensors refuses such files (MetadataIncompleteBuffer)")
    return header


def _check_tensor_entry(name: str, info: object) -> None:
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise InvalidSafetensors("corrupt", f"tensor {name!r}: entry lacks dtype/shape/data_offsets")
    if info["dtype"] not in DTYPE_BITS:
        raise InvalidSafetensors("corrupt", f"tensor {name!r} has unknown dtype {info['dtype']!r}")
    shape, offsets = info["shape"], info["data_offsets"]
    ok_shape = isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
    ok_offsets = (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                  and 0 <= offsets[0] <= offsets[1])
    if not (ok_shape and ok_offsets):
        raise InvalidSafetensors("corrupt", f"tensor {name!r}: bad shape {shape!r} or data_offsets {offsets!r}")


# --- the folder check --------------------------------------------------------------------------------

def read_manifest(path: str | os.PathLike) -> dict[str, str]:
    """``{relative path: sha256}`` from a ``sha256sum``-style file (``HASH  path`` or ``HASH *path``)."""
    out = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        digest, _, name = line.partition(" ")
        name = name.strip().lstrip("*")
        if len(digest) == 64 and name:
            out[name] = digest.lower()
    return out


def write_manifest(folder: str | os.PathLike, hashes: dict[str, str]) -> Path:
    """Write ``sha256sums.txt`` in ``folder`` (sorted; ``sha256sum -c`` can check it)."""
    path = Path(folder) / MANIFEST_NAME
    path.write_text("".join(f"{digest}  {name}\n" for name, digest in sorted(hashes.items())))
    return path


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*")
                  if p.is_file() and not set(p.relative_to(root).parts[:-1]) & set(SKIPPED_DIRS))


def _git_top(folder: Path) -> Path | None:
    from ..errors import GitCommandFailed, GitLfsMissing
    from .lfs import _git

    try:
        return Path(_git(["rev-parse", "--show-toplevel"], cwd=folder).strip())
    except (GitCommandFailed, GitLfsMissing, OSError):
        return None


def _pointer_fix(root: Path, rel: str, git_top: Path | None) -> str:
    try:
        inside = (root / rel).resolve().relative_to(git_top.resolve()).as_posix() if git_top else None
    except ValueError:  # the folder is not inside that checkout after all
        inside = None
    if inside:
        return f'cd {git_top} && git lfs pull --include "{inside}"'
    return (f"this folder was copied without its LFS contents: download {rel} again "
            f"(sd35fp8 download REPO_ID --include '{rel}'), or re-clone with git-lfs installed")


def _component_kind(class_name: str) -> str:
    if class_name.endswith(("Tokenizer", "TokenizerFast")):
        return "tokenizer"
    if "Scheduler" in class_name:
        return "scheduler"
    if class_name.endswith(("Processor", "FeatureExtractor")):
        return "processor"
    return "model"


_CONFIG_FILES = {"scheduler": ("scheduler_config.json",), "processor": ("preprocessor_config.json",),
                 "tokenizer": ("tokenizer_config.json", "tokenizer.json", "vocab.json", "spiece.model"),
                 "model": ("config.json",)}


def _check_components(root: Path, index: dict, report: VerifyReport, pointers: set[str],
                      supplied: tuple[str, ...] = ()) -> None:
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[1] is None:
            continue
        folder = root / name
        kind = _component_kind(str(spec[1]))
        fetch = f"download it again (e.g. sd35fp8 download REPO_ID --include '{name}/*'), or git lfs pull"
        if not folder.is_dir():
            report.problems.append(Problem(f"{name}/", "missing", f"component folder named in model_index.json "
                                           f"({spec[1]}) is missing", fetch))
            continue
        if not any((folder / c).is_file() for c in _CONFIG_FILES[kind]):
            report.problems.append(Problem(f"{name}/", "missing", f"no {' or '.join(_CONFIG_FILES[kind])} "
                                           f"for {spec[1]}", fetch))
        if kind != "model" or name in supplied:
            continue
        names = [p.name for p in folder.iterdir() if p.is_file()]
        safetensors = [n for n in names if n.endswith(".safetensors")]
        pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
        for index_file in (n for n in names if n.endswith(".safetensors.index.json")):
            shards = set(json.loads((folder / index_file).read_text()).get("weight_map", {}).values())
            for shard in sorted(shards - set(names)):
                report.problems.append(Problem(f"{name}/{shard}", "missing", f"shard listed in {index_file} "
                                               "is missing", fetch))
        if safetensors or any(f"{name}/{n}" in pointers for n in names):
            continue
        if pickles:
            report.problems.append(Problem(f"{name}/{pickles[0]}", "pickle", "only pickle weights: loading them "
                                           "can run arbitrary code, so sd35fp8 never loads them",
                                           f"download {name}/*.safetensors instead (most hub repos have both), "
                                           "or convert the pickle with a tool you trust on a machine you trust"))
        else:
            report.problems.append(Problem(f"{name}/", "missing", f"no weight files (*.safetensors) for {spec[1]}",
                                           fetch))


def verify_model(path: str | os.PathLike, config: VerifyConfig | None = None) -> VerifyReport:
    """Check a model folder without loading it; see the module docstring for every rule.

    A folder with ``model_index.json`` is checked as a diffusers pipeline (components, configs, weights);
    a folder without one but with weight files (a single-file checkpoint download) gets the file checks.

    Example:
        >>> report = verify_model("clone-without-lfs/")          # doctest: +SKIP
        >>> print(report.to_text())                               # doctest: +SKIP
        transformer/diffusion_pytorch_model.safetensors: Git LFS pointer (134 bytes), not the weights …
    """
    config = config or VerifyConfig()
    root = Path(path).absolute()
    single = root.is_file()  # one checkpoint file: check it alone, with hashes known for its folder
    base = root.parent if single else root
    index_path = root / "model_index.json"
    report = VerifyReport(root, "diffusers" if index_path.is_file() else "files")
    if not root.exists():
        report.problems.append(Problem(str(root), "missing", "does not exist",
                                       "check the path, or download the model: sd35fp8 download REPO_ID"))
        return report
    files = [root] if single else _files(root)
    expected = _expected_hashes(base, config)
    git_top: Path | None = None
    looked_for_git = False
    pointers: set[str] = set()
    for file in files:
        rel = file.relative_to(base).as_posix()
        pointer = read_pointer(file)
        if pointer:
            pointers.add(rel)
            if not looked_for_git:
                git_top, looked_for_git = _git_top(base), True
            report.files.append(FileCheck(rel, "pointer", file.stat().st_size))
            report.problems.append(Problem(rel, "pointer", f"Git LFS pointer ({file.stat().st_size} bytes), not the "
                                           f"weights (real size {human_bytes(pointer.size)})",
                                           _pointer_fix(base, rel, git_top)))
        elif rel.endswith(".safetensors"):
            _check_safetensors(file, rel, expected.get(rel), config, report)
        elif rel.endswith(PICKLE_SUFFIXES):
            report.files.append(FileCheck(rel, "pickle", file.stat().st_size))
            report.notes.append(f"{rel}: pickle weights, never loaded (sd35fp8 loads safetensors only)")
    for rel in sorted(set() if single else set(expected) - {f.relative_to(root).as_posix() for f in files}):
        report.problems.append(Problem(rel, "missing", "listed with a sha256 but missing",
                                       "download it again (sd35fp8 download REPO_ID, or git lfs pull)"))
    if report.layout == "diffusers":
        try:
            index = json.loads(index_path.read_text())
        except json.JSONDecodeError as exc:
            report.problems.append(Problem("model_index.json", "corrupt", f"not valid JSON ({exc})",
                                           "download model_index.json again"))
        else:
            _check_components(root, index, report, pointers, config.supplied)
    elif not report.files and not single:
        report.problems.append(Problem("model_index.json", "missing", "no model_index.json and no weight files: "
                                       "not a model folder", "point at the folder that holds model_index.json, "
                                       "or download one: sd35fp8 download REPO_ID"))
    elif not single:
        report.notes.append("no model_index.json: checked the weight files only (single-file checkpoints, "
                            "not a diffusers pipeline folder)")
    return report


def _expected_hashes(root: Path, config: VerifyConfig) -> dict[str, str]:
    if not config.check_hashes:
        return {}
    expected: dict[str, str] = {}
    if config.use_git_lfs:
        from .lfs import lfs_oids

        expected.update(lfs_oids(root))
    manifest = root / config.manifest
    if manifest.is_file():
        expected.update(read_manifest(manifest))
    expected.update(config.expected_sha256)
    return expected


def _check_safetensors(file: Path, rel: str, expected: str | None, config: VerifyConfig,
                       report: VerifyReport) -> None:
    size = file.stat().st_size
    try:
        header = read_safetensors_header(file)
    except InvalidSafetensors as exc:
        report.files.append(FileCheck(rel, "safetensors", size))
        report.problems.append(Problem(rel, exc.kind, str(exc), "delete it and download it again (a cut-off "
                                       "download or a disk error); sd35fp8 download resumes partial files"))
        return
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    status = "unknown" if expected is None else "not checked"
    if expected is not None and config.check_hashes:
        from .lfs import sha256_file

        actual = sha256_file(file)
        status = "ok" if actual == expected else "mismatch"
        if status == "mismatch":
            report.problems.append(Problem(rel, "checksum", f"sha256 {actual[:12]}… differs from the expected "
                                           f"{expected[:12]}…: the file is corrupt or was changed",
                                           "delete it and download it again (git lfs pull, or sd35fp8 download)"))
    report.files.append(FileCheck(rel, "safetensors", size, len(tensors),
                                  tuple(sorted({v["dtype"] for v in tensors.values()})), status))


def require_loadable(path: str | os.PathLike, *, check_hashes: bool = False) -> VerifyReport:
    """:func:`verify_model`, raising :class:`~sd35fp8_helpers.errors.ModelVerificationFailed` on any problem.

    ``load_pipeline`` calls this before diffusers opens a file (without hashing: headers are cheap).
    """
    report = verify_model(path, VerifyConfig(check_hashes=check_hashes))
    if not report.ok:
        raise ModelVerificationFailed(report.path, report.problems)
    return report

"""Resolve what the notebooks call "the model", and load it as a ``StableDiffusion3Pipeline``.

One function decides where the weights are — ``"scenes"`` (the embedded default), ``"tiny"``, a local folder,
or a hub repo id — and from there every source takes the same code path. SD3.5 needs
``StableDiffusion3Pipeline``: ``StableDiffusionPipeline`` (SD1.x/2.x) cannot load it, and
``torch_dtype=torch.float8_e4m3fn`` is not a way to load FP8 (see ``notebooks/02``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..constants import DEFAULT_MODEL, EMBEDDED_MODEL_DIR
from ..errors import ModelNotFound
from ..vocabulary import NONEXISTENT_REPOS, SourceKind, classify_model_spec  # noqa: F401  (re-exported)
from .tiny import TINY_MARKER


@dataclass(frozen=True)
class ModelSource:
    """Where "the model" lives once resolved: always a local diffusers-layout folder."""

    spec: str
    kind: SourceKind
    path: Path

    def __str__(self) -> str:
        return f"{self.spec} ({self.kind}: {self.path})"

    @property
    def is_tiny(self) -> bool:
        """True for the embedded tiny model, wherever it was written (it leaves a marker file)."""
        return (self.path / TINY_MARKER).is_file()


def resolve_model(model: str | Path = DEFAULT_MODEL, *, seed: int = 0) -> ModelSource:
    """Turn ``"scenes"``, ``"tiny"``, a folder, or ``"owner/name"`` into a local diffusers folder.

    * ``"scenes"`` is the trained model shipped in the package (the default);
    * ``"tiny"`` builds (once, then cached) a random-weight tiny SD3.5 pipeline;
    * an existing folder must hold ``model_index.json`` (diffusers layout);
    * a repo id is downloaded (or found in the cache) with ``huggingface_hub``.

    Example:
        >>> resolve_model("tiny").kind
        'tiny'
    """
    spec = str(model)
    kind = classify_model_spec(spec).kind  # one classifier, one set of messages (vocabulary.py)
    if kind == "embedded":
        return ModelSource(spec, "embedded", EMBEDDED_MODEL_DIR)
    if kind == "tiny":
        from .tiny import tiny_model_path

        return ModelSource(spec, "tiny", tiny_model_path(seed))
    path = Path(spec).expanduser()
    if kind == "local":
        if (path / "model_index.json").is_file():
            return ModelSource(spec, "local", path.absolute())
        raise ModelNotFound(spec, f"{path} has no model_index.json, so it is not a diffusers pipeline folder",
                            fix="point at the folder that holds model_index.json (the repository root), "
                                "or run `sd35fp8 tiny DIR` to make one")
    if kind == "comfy-file":
        raise ModelNotFound(spec, "is a single .safetensors file, not a diffusers folder",
                            fix="load it with load_comfy_pipeline(FILE) or `sd35fp8 setup FILE` (Comfy scaled FP8)")
    if kind == "git":
        raise ModelNotFound(spec, "is a git URL", fix="`sd35fp8 setup URL --dir DIR` clones it with Git LFS and "
                                                     "verifies it; then pass DIR/model")
    return ModelSource(spec, "hub", _download(spec))


def _download(repo_id: str) -> Path:
    """Fetch a diffusers-layout repo (safetensors only) into the hub cache: disk preflight, typed errors."""
    from ..weights.hub import DIFFUSERS_INCLUDE, download

    return download(repo_id, include=DIFFUSERS_INCLUDE, verify=False).path  # headers: load_pipeline checks them


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str):
    """bf16 on GPUs (SD3.5's native precision); float32 on CPU, where bf16 matmuls are slow."""
    import torch

    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def load_pipeline(model: str | Path = DEFAULT_MODEL, *, device: str | None = None, dtype=None,
                  text_encoder_3: bool = True, check_hashes: bool = False):
    """Load "the model" as a ``StableDiffusion3Pipeline`` on ``device`` (default: CUDA if present, else CPU).

    ``text_encoder_3=False`` drops T5-XXL (``text_encoder_3=None, tokenizer_3=None``): 4.8B parameters
    less, at the cost of weaker prompt following for long prompts.

    A local or downloaded folder is verified first (:func:`~sd35fp8_helpers.weights.verify.require_loadable`:
    pointer files, truncated or corrupt safetensors, missing components), so a bad folder raises
    ``ModelVerificationFailed`` naming each file and its fix instead of a safetensors stack trace.
    ``check_hashes=True`` also compares sha256 sums where known (reads every byte: slow for real models).
    A folder with float8 weights but no FP8 manifest (``sd35fp8_fp8.json``) raises ``FP8CheckpointError``:
    diffusers would load those weights with their scales ignored.
    """
    from diffusers import StableDiffusion3Pipeline

    from ..display import quiet_loading_bars

    quiet_loading_bars()
    source = resolve_model(model)
    if source.kind != "tiny":  # built here, so known good; anything from outside is checked first
        from ..weights.verify import require_loadable

        # the shipped model is checked against its sha256 manifest like any download (28 MB: milliseconds)
        require_loadable(source.path, check_hashes=check_hashes or source.kind == "embedded")
    device = device or default_device()
    dtype = dtype or default_dtype(device)
    extra = {} if text_encoder_3 else {"text_encoder_3": None, "tokenizer_3": None}
    from ..precision.checkpoint import load_fp8_components, read_manifest, require_manifest_if_float8

    manifest = read_manifest(source.path)  # a folder written by `sd35fp8 quantize`: FP8 layers built as stored
    if manifest is None and source.kind != "tiny":
        require_manifest_if_float8(source.path)  # float8 weights without it would load unscaled: refuse
    extra.update(load_fp8_components(source.path, dtype=dtype, skip=tuple(extra)) if manifest else {})
    pipe = StableDiffusion3Pipeline.from_pretrained(source.path, torch_dtype=dtype, use_safetensors=True, **extra)
    pipe.sd35fp8_source = source  # remembered for PNG metadata and reports
    if manifest:
        from ..precision.checkpoint import report_for_loaded

        pipe.sd35fp8_fp8 = report_for_loaded(pipe, manifest)
    return pipe.to(device)

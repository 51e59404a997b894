"""All sd35fp8 error types, in one place. Each names what went wrong and the fix (``error.fix``).

    Sd35fp8Error
     ├── InvalidInput (ValueError)               an argument no run could take: names it, its value, the nearest valid
     │    ├── InvalidGenerationInput             a size/step/seed the pipeline cannot take
     │    ├── InvalidTilingInput                 a tile size / canvas tiled decoding or denoising cannot take
     │    └── InvalidPlanInput                   a memory-plan budget, size or preset that makes no sense
     ├── ModelNotFound (FileNotFoundError)       "the model" is neither tiny, a folder nor a repo id
     ├── ModelVerificationFailed (ValueError)    a model folder has pointer files, truncated or pickle weights …
     ├── ComfyFormatError (ValueError)           a .safetensors file that is not a Comfy SD3 (scaled-FP8) checkpoint
     ├── FP8CheckpointError (ValueError)         an FP8 folder that would load wrong (float8, no manifest) or could not be written
     ├── LoraError (ValueError)                  a LoRA file refused: not safetensors, a key that fits no layer …
     ├── UnsupportedEnvironment (RuntimeError)   old torch, no float8, a GPU below capability 8.9 …
     │    └── FP8ComputeUnavailable              FP8 compute asked for on a device without float8 matmuls
     ├── GitLfsMissing (FileNotFoundError)       git or git-lfs not installed (message: the install command)
     ├── GitCommandFailed (RuntimeError)         a git / git lfs command exited non-zero
     ├── NotEnoughDisk (OSError)                 "needs X GB, Y GB free at PATH", before downloading
     ├── HubError                                the hub said no, translated (never shows the token):
     │    ├── GatedRepo (PermissionError)        accept the licence on the model page, then authenticate
     │    ├── HubAuthFailed (PermissionError)    401 bad/expired token, or 403 token without permission
     │    ├── RepoNotOnHub (FileNotFoundError)   404: no such repo / revision / file (or private)
     │    └── HubOffline (ConnectionError)       HF_HUB_OFFLINE=1, or the hub cannot be reached
     ├── OutOfMemoryAfterFallback (MemoryError)  every rung of the memory ladder ran out of memory
     ├── PipelinePlacementError (RuntimeError)   a strategy change left modules on the wrong device
     ├── SetupStageFailed (RuntimeError)         a `sd35fp8 setup` stage failed (names the stage)
     ├── ServerStartFailed (RuntimeError)        `sd35fp8 serve` exited or was not ready (message: its last log lines)
     ├── QueueUnavailable (ConnectionError)      the Redis job queue cannot be reached (URL shown without its password)
     └── RedisServerMissing (FileNotFoundError)  `redis-server` is not installed (message: the install command)

A user can catch everything sd35fp8 raises on purpose with ``except sd35fp8_helpers.errors.Sd35fp8Error``; the
CLI prints such an error as one line (message, then fix) and exits 1.
"""

from __future__ import annotations

from pathlib import Path


class Sd35fp8Error(Exception):
    """Base class: every error sd35fp8 raises on purpose. ``fix`` says what to do next."""

    fix: str = ""

    def __init__(self, message: str, *, fix: str = "") -> None:
        self.fix = fix
        super().__init__(f"{message}\n  fix: {fix}" if fix else message)

    @property
    def one_line(self) -> str:
        """The message on one line, for the CLI."""
        return " ".join(str(self).split())


class InvalidInput(Sd35fp8Error, ValueError):
    """An argument no run could take; carries ``argument`` and ``value`` and says what would be valid."""

    def __init__(self, argument: str, value: object, message: str, *, fix: str = "") -> None:
        self.argument = argument
        self.value = value
        super().__init__(f"{argument}={value!r} {message}", fix=fix)


class InvalidGenerationInput(InvalidInput):
    """A generation argument the pipeline cannot take.

    Example message: ``height=1000 is not a multiple of 16; nearest valid: 992 or 1008``.
    """


class InvalidTilingInput(InvalidInput):
    """A tile size, overlap or canvas that tiled VAE decoding/encoding or tiled denoising cannot take.

    Example message: ``width=1001 is not a multiple of 8 px (the VAE works on 8x8 pixel blocks); nearest
    valid: 1000 or 1008``.
    """


class ModelNotFound(Sd35fp8Error, FileNotFoundError):
    """``model`` named neither ``tiny``, an existing diffusers folder, nor a hub repo id."""

    def __init__(self, model: str, message: str, *, fix: str = "") -> None:
        self.model = model
        super().__init__(f"model {model!r}: {message}", fix=fix)


class UnsupportedEnvironment(Sd35fp8Error, RuntimeError):
    """The machine cannot do what was asked (e.g. FP8 compute on a GPU below capability 8.9)."""


class FP8ComputeUnavailable(UnsupportedEnvironment):
    """FP8 *compute* was asked for on a device that cannot multiply in float8.

    Example message: ``FP8 compute is not possible on cpu: cpu has no float8 tensor cores …
    fix: use FP8Config(mode="storage") (halves weight memory anywhere) or mode="auto"``.
    """

    def __init__(self, device: str, capability: tuple[int, int] | None, reason: str) -> None:
        self.device = device
        self.capability = capability
        super().__init__(f"FP8 compute is not possible on {device}: {reason}",
                         fix='use FP8Config(mode="storage") (halves weight memory anywhere) or mode="auto", '
                             "or run on an Ada/Hopper GPU (RTX 40xx, L4, L40, H100, H200)")


class ComfyFormatError(Sd35fp8Error, ValueError):
    """A file given as a Comfy SD3 checkpoint is not one (no ``model.diffusion_model.joint_blocks`` keys …)."""

    def __init__(self, file: Path | str, message: str, *, fix: str = "") -> None:
        self.file = Path(file)
        super().__init__(f"{self.file.name}: {message}", fix=fix)


class FP8CheckpointError(Sd35fp8Error, ValueError):
    """An FP8 checkpoint folder that cannot be trusted or written; carries ``folder``.

    Example message: ``sd35-fp8: holds float8 weights (transformer/diffusion_pytorch_model.safetensors: 31
    float8 tensors) but no sd35fp8_fp8.json … fix: write it again with `sd35fp8 quantize MODEL sd35-fp8` …``.
    Without the manifest the float8 weights would load into plain layers with their scales ignored.
    """

    def __init__(self, folder: Path | str, message: str, *, fix: str = "") -> None:
        self.folder = Path(folder)
        super().__init__(f"{self.folder}: {message}", fix=fix)


class InvalidPlanInput(InvalidInput):
    """A memory-plan input that cannot describe a real run.

    Example message: ``vram=-4 must be a positive number of GiB fix: pass your card's memory, e.g. --vram 12``.
    """


class OutOfMemoryAfterFallback(Sd35fp8Error, MemoryError):
    """Generation ran out of memory on every rung of the strategy ladder; lists the steps taken."""

    def __init__(self, strategy: str, steps: list[str]) -> None:
        self.strategy = strategy
        self.steps = list(steps)
        taken = "; ".join(steps) if steps else "none"
        super().__init__(f"out of memory even with the leanest strategy tried ({strategy}); steps taken: {taken}",
                         fix="generate a smaller image, or run `sd35fp8 plan --vram GIB` to see what fits this card")


class PipelinePlacementError(Sd35fp8Error, RuntimeError):
    """After a strategy change, some modules are not where the strategy says they rest (half-moved)."""

    def __init__(self, strategy: str, misplaced: list[str]) -> None:
        self.strategy = strategy
        self.misplaced = list(misplaced)
        super().__init__(f"strategy {strategy!r} left modules on the wrong device: {'; '.join(misplaced)}",
                         fix="reload the pipeline (load_pipeline) and apply the strategy once, before generating")


class GitLfsMissing(Sd35fp8Error, FileNotFoundError):
    """``git`` or ``git-lfs`` is not installed; the fix is the install command for this system.

    Example message: ``git-lfs is not installed: a clone would give ~130-byte pointer files, not weights
    fix: sudo apt-get install git-lfs && git lfs install``.
    """

    def __init__(self, program: str, install: str) -> None:
        self.program = program
        self.install = install
        why = "model repositories cannot be cloned" if program == "git" else \
            "a clone would give ~130-byte pointer files, not weights"
        super().__init__(f"{program} is not installed: {why}", fix=install)


class GitCommandFailed(Sd35fp8Error, RuntimeError):
    """A ``git`` / ``git lfs`` command exited non-zero; carries the command and its last stderr line."""

    def __init__(self, command: list[str], returncode: int, stderr: str, *, fix: str = "") -> None:
        self.command = list(command)
        self.returncode = returncode
        self.stderr = stderr
        last = next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), "no message")
        super().__init__(f"`{' '.join(self.command)}` failed (exit {returncode}): {last}", fix=fix)


class ModelVerificationFailed(Sd35fp8Error, ValueError):
    """A model folder would not load: pointer files, truncated/corrupt safetensors, pickle-only weights …

    Raised by ``load_pipeline`` before diffusers sees the folder, so the user reads one line per problem
    instead of ``SafetensorError: Error while deserializing header: header too large``. ``problems`` holds
    the :class:`~sd35fp8_helpers.weights.verify.Problem` list.
    """

    def __init__(self, path: Path, problems: list) -> None:
        self.path = Path(path)
        self.problems = list(problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"{self.path} cannot be loaded ({len(self.problems)} problem"
                         f"{'s' if len(self.problems) != 1 else ''}):\n{lines}",
                         fix=f"fix the files above, then check with: sd35fp8 verify {self.path}")


class NotEnoughDisk(Sd35fp8Error, OSError):
    """Not enough free space for a download; raised before the first byte is fetched."""

    def __init__(self, path: Path, need_bytes: int, free_bytes: int) -> None:
        self.path = Path(path)
        self.need_bytes = need_bytes
        self.free_bytes = free_bytes
        def gb(n: int) -> str:  # decimal units, as disk makers and `df -H` count
            return f"{n / 1e9:.2f} GB" if n >= 10**8 else f"{n / 1e6:.1f} MB"

        super().__init__(f"needs {gb(need_bytes)}, {gb(free_bytes)} free at {self.path}",
                         fix="free some space, or download elsewhere: --local-dir on a larger disk, or set "
                             "HF_HUB_CACHE (or HF_HOME) to a folder on a larger, fast local disk")


class SetupStageFailed(Sd35fp8Error, RuntimeError):
    """A stage of ``sd35fp8 setup`` failed; ``stage`` names it (the CLI exits with that stage's code).

    Example message: ``stage 'verify' failed: transformer/…safetensors: sha256 9f42… differs from the expected
    8d8a… fix: delete …/transformer/…safetensors and run the same `sd35fp8 setup` again``.
    """

    def __init__(self, stage: str, message: str, *, fix: str = "") -> None:
        self.stage = stage
        super().__init__(f"stage {stage!r} failed: {message}", fix=fix)


class ServerStartFailed(Sd35fp8Error, RuntimeError):
    """``sd35fp8 serve`` could not load its model, exited early, or was not ready in time.

    Example message: ``sd35fp8 serve exited with code 1 before it was ready: … ModelNotFound …
    fix: read the whole log: /tmp/sd35fp8-serve-…/server.log``.
    """


class HubError(Sd35fp8Error):
    """The hub refused or could not be reached. Messages name the repo and the fix, never the token."""

    def __init__(self, repo_id: str, message: str, *, fix: str = "") -> None:
        self.repo_id = repo_id
        super().__init__(f"{repo_id}: {message}", fix=fix)


class GatedRepo(HubError, PermissionError):
    """The repo is gated (all SD3.5 repos are): accept the licence on its page, then authenticate."""


class HubAuthFailed(HubError, PermissionError):
    """401 with a token the hub rejects (invalid, expired), or 403 (the token lacks a permission)."""


class RepoNotOnHub(HubError, FileNotFoundError):
    """No such repo, revision or file on the hub — or a private repo this token cannot see."""


class HubOffline(HubError, ConnectionError):
    """``HF_HUB_OFFLINE=1`` is set, or the hub cannot be reached (no network, proxy, wrong ``HF_ENDPOINT``)."""


class QueueUnavailable(Sd35fp8Error, ConnectionError):
    """The Redis server behind the job queue (``--broker``) did not answer in time, or refused the connection.

    Example message: ``the job queue at redis://127.0.0.1:6379/0 cannot be reached (Connection refused)
    fix: start Redis (redis-server --port 6379) or pass the right --broker URL``. A password in the URL is
    never shown.
    """

    def __init__(self, url: str, reason: str, *, fix: str = "") -> None:
        self.url = url
        super().__init__(f"the job queue at {url} cannot be reached ({reason})",
                         fix=fix or "start Redis (e.g. `redis-server --port 6379`) or pass the right --broker URL")


class RedisServerMissing(Sd35fp8Error, FileNotFoundError):
    """``redis-server`` is not on PATH, so a local queue (tests, notebook 06) cannot be started."""

    def __init__(self) -> None:
        super().__init__("redis-server is not installed: the job queue needs a Redis server",
                         fix="sudo apt-get install -y redis-server (macOS: brew install redis), or point "
                             "--broker at a Redis server elsewhere")


class LoraError(Sd35fp8Error, ValueError):
    """A LoRA that cannot be applied: not a safetensors file, a key that matches no layer, a wrong shape.

    Carries ``file`` and the first offending ``key`` (None when the problem is the file itself).
    Example message: ``style.safetensors: key 'transformer.transformer_blocks.0.attn.to_q.lora_B.weight' has
    shape (64, 4) but transformer_blocks.0.attn.to_q has 32 output features fix: this LoRA was trained for
    another model (SD3.5 Medium vs Large?); use one made for this pipeline``.
    """

    def __init__(self, file: "Path | str", message: str, *, key: str | None = None, fix: str = "") -> None:
        self.file = Path(file)
        self.key = key
        where = f"key {key!r} " if key else ""
        super().__init__(f"{self.file.name}: {where}{message}", fix=fix)

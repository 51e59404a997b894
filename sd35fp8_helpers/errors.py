"""All sd35fp8 error types, in one place. Each names what went wrong and the fix.

    Sd35fp8Error
     ├── InvalidGenerationInput (ValueError)   a size/step/seed the pipeline cannot take
     ├── ModelNotFound (FileNotFoundError)     "the model" is neither tiny, a folder nor a repo id
     ├── UnsupportedEnvironment (RuntimeError) old torch, no float8, a GPU below capability 8.9 …
     └── NotebookFailed (RuntimeError)         a notebook cell raised while the runner executed it

Later modules add their own here so that a user can ``except sd35fp8_helpers.errors.Sd35fp8Error``.
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


class InvalidGenerationInput(Sd35fp8Error, ValueError):
    """A generation argument the pipeline cannot take.

    Example message: ``height=1000 is not a multiple of 16; nearest valid: 992 or 1008``.
    """

    def __init__(self, argument: str, value: object, message: str, *, fix: str = "") -> None:
        self.argument = argument
        self.value = value
        super().__init__(f"{argument}={value!r} {message}", fix=fix)


class ModelNotFound(Sd35fp8Error, FileNotFoundError):
    """``model`` named neither ``tiny``, an existing diffusers folder, nor a hub repo id."""

    def __init__(self, model: str, message: str, *, fix: str = "") -> None:
        self.model = model
        super().__init__(f"model {model!r}: {message}", fix=fix)


class UnsupportedEnvironment(Sd35fp8Error, RuntimeError):
    """The machine cannot do what was asked (e.g. FP8 compute on a GPU below capability 8.9)."""


class NotebookFailed(Sd35fp8Error, RuntimeError):
    """A notebook cell raised while the runner executed it; names the notebook and the cell."""

    def __init__(self, notebook: Path, cell: str, error: str) -> None:
        self.notebook = Path(notebook)
        self.cell = cell
        self.error = error
        super().__init__(f"{self.notebook.name}: {cell} raised {error}",
                         fix=f"open {self.notebook} in Jupyter and run the cells above it to see the traceback")

"""Docstring examples are part of the documentation: each one runs here, against the real tiny model."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import sd35fp8_helpers

MODULES = sorted(m.name for m in pkgutil.iter_modules(sd35fp8_helpers.__path__, "sd35fp8_helpers."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples failed in {name}"

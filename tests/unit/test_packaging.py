"""pyproject.toml: metadata in the forms current build backends take without a warning.

Building in a fresh environment would need the package index, and tests talk only to
127.0.0.1, so this reads the file. The check by hand: ``python -m venv /tmp/v &&
/tmp/v/bin/pip install -v -e .`` prints no SetuptoolsDeprecationWarning.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def _pyproject() -> dict[str, Any]:
    if sys.version_info < (3, 11):
        pytest.skip("tomllib is new in Python 3.11")
    import tomllib

    data: dict[str, Any] = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))
    return data


def test_license_is_an_spdx_string_and_the_backend_reads_it() -> None:
    data = _pyproject()
    # A table ({text = "MIT"}) makes setuptools >= 77 warn on every install (PEP 639).
    assert data["project"]["license"] == "MIT"
    # Older setuptools cannot read the string form: require one that can.
    (setuptools,) = [r for r in data["build-system"]["requires"] if r.startswith("setuptools")]
    match = re.fullmatch(r"setuptools>=(\d+)(\.\d+)*", setuptools.replace(" ", ""))
    assert match is not None and int(match.group(1)) >= 77, setuptools

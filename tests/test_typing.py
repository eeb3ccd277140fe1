"""The package type-checks under the project's mypy configuration (``[tool.mypy]``)."""

from __future__ import annotations

from pathlib import Path

import pytest

mypy_api = pytest.importorskip("mypy.api")

ROOT = Path(__file__).resolve().parents[1]


def test_mypy_reports_no_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    # from the repository root so that pyproject.toml's [tool.mypy] section applies
    monkeypatch.chdir(ROOT)
    stdout, stderr, status = mypy_api.run(["src/advguard"])
    assert status == 0, f"mypy found errors:\n{stdout}{stderr}"
    assert "Success: no issues found" in stdout

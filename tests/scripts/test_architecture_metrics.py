"""scripts/architecture_metrics.py: the figures issue 21's note quotes, counted from source alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "architecture_metrics.py"


def _package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def test_counts_a_cycle_hidden_in_a_function_and_ignores_type_checking_imports(tmp_path) -> None:
    package = _package(tmp_path, {
        "__init__.py": "",
        "a.py": "from pkg.b import helper\n\n\ndef f():\n    return helper()\n",
        "b.py": ("from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from pkg.c import C\n\n\n"
                 "def helper():\n    from pkg.a import f  # the cycle, hidden\n    return f\n"),
        "c.py": "from pkg.a import _private\n\nclass C:\n    pass\n" + "\n" * 40,
        "sub/__init__.py": "",
    })
    result = _run(str(package), "--list")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "modules: 5" in out
    assert "largest file: " in out and "c.py (44 lines)" in out
    assert "import cycles: 1 (2 modules in them)" in out  # a <-> b; c -> a is one way, TYPE_CHECKING does not count
    assert "cycle: pkg.a <-> pkg.b" in out
    assert "function-level imports of the package: 1 (1 with a comment saying why)" in out
    assert "private names imported across modules: 1" in out and "pkg.c:1 -> pkg.a._private" in out


def test_a_package_without_cycles_says_zero(tmp_path) -> None:
    package = _package(tmp_path, {"__init__.py": "", "low.py": "X = 1\n", "high.py": "from pkg.low import X\n"})
    out = _run(str(package)).stdout
    assert "import cycles: 0 (0 modules in them)" in out
    assert "function-level imports of the package: 0 (0 with a comment saying why)" in out


def test_a_folder_that_is_not_a_package_is_one_usage_error(tmp_path) -> None:
    result = _run(str(tmp_path))
    assert result.returncode == 2
    assert "not a package folder (no __init__.py)" in result.stderr
    assert "Traceback" not in result.stderr

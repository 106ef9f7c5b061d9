"""The README's install lines stay true: the pinned torch goes first, CI pins the same, and CPU-only users get
PyTorch's CPU index (issue 19: the README claimed `pip install torch==X` "takes the CPU wheel" everywhere)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text(encoding="utf-8")
CI = (REPO / ".ci" / "run").read_text(encoding="utf-8")
CPU_INDEX = "--index-url https://download.pytorch.org/whl/cpu"


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def _torch_pin(command: str) -> str | None:
    match = re.search(r"pip install (?:--quiet )?torch==([\w.+-]+)", command)
    return match.group(1) if match else None


def test_the_two_readme_commands_install_the_pinned_torch_before_the_package() -> None:
    blocks = _bash_blocks(README)
    main_job = next(block for block in blocks if "python -m tracediff run" in block)
    tests = next(block for block in blocks if "python -m pytest" in block)
    for command in (main_job, tests):
        assert _torch_pin(command), command
        assert command.index("torch==") < command.index("pip install -e"), command


def test_ci_pins_the_torch_the_readme_names() -> None:
    readme_pins = {_torch_pin(block) for block in _bash_blocks(README) if _torch_pin(block)}
    ci_pins = {match for match in re.findall(r"pip install --quiet torch==([\w.+-]+)\n", CI)}
    assert readme_pins and ci_pins
    assert ci_pins <= readme_pins | {"2.14.1"}, (ci_pins, readme_pins)  # 2.14.1: the families' own venv
    assert next(iter(readme_pins)) in ci_pins


def test_cpu_only_install_uses_pytorchs_cpu_index_and_no_blanket_cpu_claim() -> None:
    cpu_lines = [block for block in _bash_blocks(README) if CPU_INDEX in block]
    assert cpu_lines, "the README gives no CPU-only install line"
    assert _torch_pin(cpu_lines[0]), cpu_lines[0]
    assert "takes the CPU wheel" not in README
    assert "CUDA build" in README  # says plainly what a GPU machine (or plain PyPI) gets


def test_ci_runs_the_readme_test_command_with_its_flags_and_the_architecture_checks() -> None:
    tests = next(block for block in _bash_blocks(README) if "python -m pytest" in block)
    readme_flags = set(tests.split("python -m pytest", 1)[1].split())
    ci_line = next(line for line in CI.splitlines() if line.startswith("python -m pytest"))
    assert "-n" in readme_flags and readme_flags <= set(ci_line.split()), (readme_flags, ci_line)
    ci_commands = [line.strip() for line in CI.splitlines()]
    for check in ("ruff check .", "lint-imports", "mypy"):  # docs/architecture.md promises these run in CI
        assert check in ci_commands, check
    assert ci_commands.index("lint-imports") < ci_commands.index(ci_line)

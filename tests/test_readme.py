"""The README's commands are what CI runs, and they pin the CPU torch."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = [line for line in readme.splitlines() if line.startswith("pip install")]
    assert len(commands) == 2, f"README must hold exactly two set-up commands, found {commands}"
    main_job, tests = commands
    assert "pytest" in tests and "pytest" not in main_job
    for cmd in commands:
        assert "torch==2.13.0" in cmd, f"{cmd!r} must pin torch==2.13.0 (an unpinned torch pulls CUDA builds)"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "grep -E '^pip install .*pytest' README.md" in ci


def test_torch_is_not_a_build_requirement():
    text = (ROOT / "pyproject.toml").read_text()
    build = re.search(r"\[build-system\](.*?)(\n\[|\Z)", text, re.S).group(1)
    requires = re.search(r"^requires\s*=\s*\[(.*?)\]", build, re.S | re.M).group(1)
    assert "setuptools" in requires and "torch" not in requires

"""The README's two commands stay true: CI runs the second one verbatim."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index("```bash")
    block = lines[start + 1 : lines.index("```", start)]
    return [line for line in block if line and not line.startswith("#")]


def test_readme_opens_with_run_and_test_commands():
    run, test = readme_commands()[:2]
    assert "sct-edge run --profile steamdeck" in run
    assert "pytest" in test


def test_ci_runs_the_readme_test_command():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci_lines

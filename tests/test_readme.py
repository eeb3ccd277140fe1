"""Keep the README honest: its set-up commands match CI, and its Python examples run."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_two_setup_commands_and_ci_runs_the_second():
    setup = README.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", setup, flags=re.S)
    assert len(commands) == 2, commands
    assert "advguard quickstart" in commands[0]
    assert "pytest" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1].strip() in ci.splitlines(), "CI must run README command 2 verbatim"


def test_python_examples_run():
    blocks = _blocks("python")
    assert blocks, "README has Python examples"
    namespace: dict = {"__name__": "__readme__"}
    for code in blocks:  # later examples may reuse names from earlier ones, as a reader would
        exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["report"].results

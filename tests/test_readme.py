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


def _readme_commands() -> list[list[str]]:
    """Every ``advguard ...`` command line in the README's shell blocks (continuations joined,
    comments, ``[optional]`` brackets and ``| alternatives`` stripped)."""
    import shlex

    blocks, current, lang = [], [], None
    for line in README.splitlines():
        if line.startswith("```"):
            if lang is None:
                lang, current = line[3:].strip(), []
            else:
                if lang in ("", "bash"):
                    blocks.append("\n".join(current))
                lang = None
        elif lang is not None:
            current.append(line)
    out = []
    for block in blocks:
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if not line.startswith("advguard "):
                continue
            for part in line.split(" && "):
                part = part.strip().split(" | ", 1)[0].replace("[", " ").replace("]", " ")
                if part.startswith("advguard "):
                    out.append(shlex.split(part)[1:])
    return out


def test_readme_commands_and_options_exist():
    """The README names only commands and options that the CLI has (it runs `--help`-free:
    it walks the click command tree)."""
    import typer

    from advguard.cli import app

    root = typer.main.get_command(app)
    group = type(root)  # typer's group class (typer may vendor its own click)
    commands = _readme_commands()
    assert len(commands) >= 15, commands
    for args in commands:
        cmd = root
        ctx = typer.Context(root)
        i = 0
        while isinstance(cmd, group) and i < len(args) and not args[i].startswith("-"):
            sub = cmd.get_command(ctx, args[i])
            assert sub is not None, f"README: `advguard {' '.join(args)}`: no command {args[i]!r}"
            cmd, i = sub, i + 1
        assert not isinstance(cmd, group), f"README: `advguard {' '.join(args)}` is a group"
        known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
        for tok in args[i:]:
            if tok.startswith("-"):
                name = tok.split("=", 1)[0]
                assert name in known, f"README: `advguard {' '.join(args)}`: no option {name}"

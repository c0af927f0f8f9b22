"""Print a Quick start command of README.md: `python .ci/quickstart.py run|test` (CI runs the README's own line)."""

import pathlib
import re
import sys


def quickstart_commands(readme: str) -> list[str]:
    """Return the command lines of the first code block under the '## Quick start' heading."""
    section = readme.split("## Quick start", 1)[1]
    block = re.search(r"```(?:bash|sh)?\n(.*?)```", section, flags=re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


if __name__ == "__main__":
    commands = quickstart_commands((pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text())
    print(commands[{"run": 0, "test": 1}[sys.argv[1]]])

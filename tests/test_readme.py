"""The README's Quick start is exactly two single-line commands, and CI runs the second one verbatim."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_quickstart_has_two_commands_and_ci_runs_the_test_command():
    sys.path.insert(0, str(ROOT / ".ci"))
    from quickstart import quickstart_commands

    commands = quickstart_commands((ROOT / "README.md").read_text())
    assert len(commands) == 2
    install_and_run, install_and_test = commands
    assert "pip install torch==2.13.0" in install_and_run and "monai.bundle run" in install_and_run
    assert "pip install torch==2.13.0" in install_and_test and "pytest" in install_and_test
    import ast
    import shlex

    words = shlex.split(install_and_run)
    configs = ast.literal_eval(words[words.index("--config_file") + 1])  # MONAI's list of config files
    assert configs[-1] == "bundles/foba_toy/configs/pipeline.yaml" and all((ROOT / c).is_file() for c in configs)
    printed = subprocess.run([sys.executable, str(ROOT / ".ci" / "quickstart.py"), "test"], capture_output=True,
                             text=True, check=True).stdout.strip()
    assert printed == install_and_test
    assert "quickstart.py test" in (ROOT / ".ci" / "run").read_text()


def test_torchvision_is_never_required():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    assert not [r for r in requirements if "torchvision" in r]
    assert "torch>=" in " ".join(requirements)  # any CPU or CUDA build, installed first (see README)

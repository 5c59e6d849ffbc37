"""What the READMEs show still exists: every `python -m MODULE` is a module here, every script,
config and data file a command names is in the repository, every `make TARGET` is in the Makefile
and every relative link points at a file. Cheap and static: which test runs each command for
real is listed in the issue's closing note; this catches a rename the READMEs did not follow.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
READMES = sorted([ROOT / "README.md", *ROOT.glob("*/README.md")])
REPO_DIRS = ("configs/", "data/", "tests/", "benchmarks/", "cluster/", "jobs/", "tune/", "serve/")


def shell_commands(text: str) -> list[str]:
    """The commands of a README's ```bash blocks: continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def words(command: str) -> list[str]:
    try:
        return shlex.split(command)
    except ValueError:  # a quote spanning a $(...) the shell would read: split plainly
        return command.split()


def problems_of(command: str, make_targets: set[str]) -> list[str]:
    found = []
    argv = words(command)
    for i, word in enumerate(argv):
        if word == "-m" and i and argv[i - 1].endswith("python") and i + 1 < len(argv):
            module = argv[i + 1]
            if importlib.util.find_spec(module) is None:
                found.append(f"no module {module}")
        elif word == "make" and i + 1 < len(argv) and argv[i + 1] not in make_targets:
            found.append(f"no make target {argv[i + 1]}")
        else:
            path = word.split("=", 1)[-1]  # key=path overrides name files too
            literal = "$" not in path and "*" not in path
            if path.startswith(REPO_DIRS) and literal and not (ROOT / path).exists():
                found.append(f"no file {path}")
    return found


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([a-z][a-z-]*):", text, flags=re.M))


@pytest.mark.parametrize("readme", READMES, ids=lambda p: str(p.relative_to(ROOT)))
def test_readme_commands_name_what_exists(readme, monkeypatch):
    monkeypatch.chdir(ROOT)
    targets = make_targets()
    problems = [
        f"{command!r}: {problem}"
        for command in shell_commands(readme.read_text())
        for problem in problems_of(command, targets)
    ]
    assert not problems, f"{readme.relative_to(ROOT)}:\n" + "\n".join(problems)


@pytest.mark.parametrize("readme", READMES, ids=lambda p: str(p.relative_to(ROOT)))
def test_readme_links_point_at_files(readme):
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme.read_text())
    local = [link for link in links if "://" not in link]
    missing = [link for link in local if not (readme.parent / link).exists()]
    assert not missing, f"{readme.relative_to(ROOT)}: links to missing files {missing}"


def test_the_readmes_agree_on_one_registry():
    """The registry the CLI writes is the one configs/serve.yaml serves."""
    front = (ROOT / "README.md").read_text()
    assert "export RAYFT_REGISTRY=runs/registry" in front
    assert "registry: runs/registry" in (ROOT / "configs/serve.yaml").read_text()

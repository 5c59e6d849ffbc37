"""The docs say what is true: every README.md and docs/*.md, read as markdown (markdown-it-py).

Each failure names the doc and the line. Checked, statically (no Ray, no subprocess, nothing heavy
imported):
- code fences: none left open, none swallowing another fence's opening line (a stray ```);
- relative links and images point at files, and their #anchors at headings (GitHub's slugs);
- repository paths, in prose, code spans and code blocks (`jobs/x.py`, configs/y.yaml, `finetune.py`
  beside the doc), and dotted names (`jobs.finetune.run_job`, `serve.app:build_app`) exist;
- every `python -m MODULE` is a module, every `python SCRIPT.py` a file, every `make TARGET` a target;
- `KEY=VALUE` overrides of jobs.finetune, jobs.prepare, cluster.submit (and tune.pipeline's `job.*`),
  and code spans such as `train.lr=1e-4`, are fields of the job config (jobs/config.py's JobConfig,
  walked through pydantic's model_fields; jobs.prepare also takes its own PrepareConfig);
- `--flags` of `python -m MODULE` and `python SCRIPT.py`: each must be named in the module's source or
  in a repository module it imports (a literal "--flag", or a parameter `flag` as typer derives
  `--flag` / `--no-flag` from it). Running each CLI's --help would be exact but starts torch or Ray;
- `pytest -m MARKER FILE`: the marker is registered and FILE marks tests with it.
"""

from __future__ import annotations

import ast
import fnmatch
import functools
import importlib.util
import os
import re
import shlex
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import pytest
from markdown_it import MarkdownIt
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "inference", "jobs", "tune", "serve", "cluster", "benchmarks")
REPO_DIRS = (*PACKAGES, "configs", "data", "docs", "tests", "requirements")
# A path into the repository inside any text: not the tail of a longer path (ray/serve/x.py).
PATH_IN_TEXT = re.compile(rf"(?<![\w./@:-])((?:\.\./)*(?:{'|'.join(REPO_DIRS)})/[\w./-]*)")
# NAME, ..., *, $VAR, {x}, <x> and one-letter names (tests/test_x.py) stand for any file.
PLACEHOLDER = re.compile(r"[A-Z]{2,}|\.\.\.|…|\*|\$|\{|<|(?:^|[/_])[a-z]\.\w+$")
DOTTED_NAME = re.compile(rf"({'|'.join(PACKAGES)})((?:\.\w+)+|(?:\.\w+)*:\w+)(\(.*\))?")
# Ray's own `serve.run` and `tune.Tuner`, and the pipeline's `serve.url` keys, read like our packages.
RAY_NAMESAKES = ("serve", "tune")
PYTHON = re.compile(r"(?:^|[\s(/=])python3?$")
SHELL_STOP = {"|", "||", "&&", ";", ")", ">", "<", "&", "2>", "2>&1"}
KEY_ARG = re.compile(r"([a-z_][a-z0-9_]*(?:\.[a-z0-9_]+)*)=(.*)")
JOB_SCHEMA_MODULES = {"jobs.finetune", "jobs.prepare", "cluster.submit"}


@dataclass
class Snippet:
    """A piece of a doc's text with the doc line it starts on (1-based)."""

    text: str
    line: int
    kind: str  # "prose", "code" (a code span) or "block" (a fenced or indented code block)


def documents() -> list[Path]:
    """README.md everywhere git would track it, and docs/*.md."""
    ignored = [
        p.strip().strip("/")
        for p in (ROOT / ".gitignore").read_text().splitlines()
        if p.strip().endswith("/")
    ]
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [
            d
            for d in dirs
            if not d.startswith(".") and not any(fnmatch.fnmatch(d, p) for p in ignored)
        ]
        found += [Path(folder) / f for f in files if f == "README.md"]
    return sorted({*found, *ROOT.glob("docs/*.md")})


DOCS = documents()


def parse(text: str):
    return MarkdownIt("commonmark").enable("table").parse(text)


def line_of(needle: str, lines: list[str], start: int, end: int) -> int:
    """The 1-based line in [start, end) holding needle (or its first words), else start + 1."""
    for probe in (needle, needle[:30], needle.split(" ")[0]):
        for i in range(start, min(end, len(lines))):
            if probe and probe in lines[i]:
                return i + 1
    return start + 1


def snippets(text: str) -> Iterator[Snippet]:
    """Prose, code spans and code blocks, each with its line."""
    lines = text.splitlines()
    block_map = [0, 1]
    for token in parse(text):
        if token.map:
            block_map = token.map
        if token.type in ("fence", "code_block"):
            first = token.map[0] + (1 if token.type == "fence" else 0)
            for i, line in enumerate(token.content.splitlines()):
                yield Snippet(line, first + i + 1, "block")
        elif token.type == "inline":
            for child in token.children or []:
                if child.type in ("text", "code_inline"):
                    line = line_of(child.content, lines, *block_map)
                    kind = "code" if child.type == "code_inline" else "prose"
                    yield Snippet(child.content, line, kind)


# ---------------------------------------------------------------- fences


def fence_problems(text: str) -> list[str]:
    lines = text.splitlines()
    problems = []
    for token in parse(text):
        if token.type != "fence":
            continue
        start, end = token.map
        closer = lines[end - 1].strip() if end - 1 > start else ""
        if not (closer and set(closer) == {token.markup[0]} and len(closer) >= len(token.markup)):
            problems.append(f"{start + 1}: code fence {token.markup} is never closed")
        for i, line in enumerate(token.content.splitlines()):
            if line.lstrip().startswith(token.markup):
                problems.append(
                    f"{start + i + 2}: a fence line inside the code block opened at line "
                    f"{start + 1}: a stray or unclosed fence before it"
                )
    return problems


# ---------------------------------------------------------------- links and anchors


def slug(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


@functools.cache
def anchors(doc: Path) -> frozenset[str]:
    tokens = parse(doc.read_text())
    seen: dict[str, int] = {}
    for opening, inline in zip(tokens, tokens[1:], strict=False):
        if opening.type == "heading_open":
            base = slug("".join(c.content for c in inline.children or []))
            seen[base] = seen.get(base, -1) + 1
            seen[f"{base}-{seen[base]}" if seen[base] else base] = 0
    return frozenset(seen)


def link_problems(doc: Path, text: str) -> list[str]:
    lines = text.splitlines()
    problems = []
    block_map = [0, 1]
    for token in parse(text):
        block_map = token.map or block_map
        for child in token.children or []:
            target = child.attrGet("href") or child.attrGet("src")
            if not target or re.match(r"[a-z]+:", str(target)):
                continue
            target = str(target)
            line = line_of(f"({target}", lines, *block_map)
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            if not file.exists():
                problems.append(f"{line}: link to a missing file {path}")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                problems.append(
                    f"{line}: link to a missing heading #{anchor} in {path or doc.name}"
                )
    return problems


# ---------------------------------------------------------------- paths and dotted names


def exists_from(doc: Path, path: str) -> bool:
    path = path.split(":")[0].rstrip(".,;")
    return (ROOT / path).exists() or (doc.parent / path).exists()


def path_problems(doc: Path, snippet: Snippet) -> list[str]:
    found = [m.rstrip(".,;:") for m in PATH_IN_TEXT.findall(snippet.text)]
    if snippet.kind == "code" and re.fullmatch(r"[\w-]+\.py", snippet.text):
        found.append(snippet.text)  # a module of the doc's folder: `finetune.py`
    return [
        f"{snippet.line}: no file {path}"
        for path in found
        if not PLACEHOLDER.search(path) and not exists_from(doc, path)
    ]


def module_file(dotted: str) -> Path | None:
    base = ROOT / dotted.replace(".", "/")
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@functools.cache
def top_level_names(file: Path) -> frozenset[str]:
    names = set()
    for node in ast.parse(file.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
    return frozenset(names)


def dotted_name_problem(text: str) -> str | None:
    """`jobs.finetune.run_job`, `serve.app:build_app`: the module, and the name in it, exist."""
    match = DOTTED_NAME.fullmatch(text)
    if not match or (ROOT / text).exists():  # cluster.yaml is a file
        return None
    parts = (match[1] + match[2]).replace(":", ".").split(".")
    for cut in range(len(parts), 0, -1):
        file = module_file(".".join(parts[:cut]))
        if file is None:
            continue
        name = parts[cut] if cut < len(parts) else None
        namesake = cut == 1 and parts[0] in RAY_NAMESAKES
        if name and not namesake and name not in top_level_names(file):
            return f"no {name} in {file.relative_to(ROOT)} (for {text})"
        return None
    return f"no module {text}"


# ---------------------------------------------------------------- commands


def logical_lines(snippets_: list[Snippet]) -> Iterator[Snippet]:
    """Code blocks' lines with their `\\` continuations joined; code spans as they are."""
    pending: Snippet | None = None
    for s in snippets_:
        if s.kind == "prose":
            continue
        if pending is not None:
            pending = Snippet(pending.text + " " + s.text.strip(), pending.line, s.kind)
        else:
            pending = Snippet(s.text, s.line, s.kind)
        if s.kind == "block" and pending.text.endswith("\\"):
            pending.text = pending.text[:-1]
            continue
        yield Snippet(re.split(r"(?:^|\s)#", pending.text)[0], pending.line, pending.kind)
        pending = None


def words(command: str) -> list[str]:
    try:
        return shlex.split(command)
    except ValueError:  # an unbalanced quote, e.g. inside $(...): split plainly
        return command.split()


def invocations(command: str) -> Iterator[tuple[str, list[str]]]:
    """("-m MODULE", "SCRIPT.py", "pytest" or "make", its arguments) for each call in a command."""
    argv = words(command)
    for i, word in enumerate(argv):
        nxt = argv[i + 1] if i + 1 < len(argv) else ""
        if PYTHON.search(word) and nxt == "-m" and i + 2 < len(argv):
            target, rest = (
                ("pytest" if argv[i + 2] == "pytest" else f"-m {argv[i + 2]}"),
                argv[i + 3 :],
            )
        elif PYTHON.search(word) and nxt.endswith(".py"):
            target, rest = nxt, argv[i + 2 :]
        elif word in ("pytest", "make"):
            target, rest = word, argv[i + 1 :]
        else:
            continue
        args = []
        for arg in rest:
            if arg in SHELL_STOP or arg.startswith("#"):
                break
            args.append(arg)
        yield target, args


def command_problems(snippet: Snippet, markers: set[str]) -> list[str]:
    problems = []
    for target, args in invocations(snippet.text):
        if target == "pytest":
            problems += marker_problems(args, markers)
        elif target == "make":
            missing = [a for a in args[:1] if a not in make_targets() and "=" not in a]
            problems += [f"no make target {a} (Makefile)" for a in missing]
        elif target.startswith("-m "):
            problems += module_command_problems(target[3:], args)
        elif (ROOT / target).is_file():
            problems += [f"{target}: {p}" for p in flag_problems(ROOT / target, args)]
        elif not PLACEHOLDER.search(target):
            problems.append(f"no script {target}")
    return [f"{snippet.line}: {p}" for p in problems]


def module_command_problems(module: str, args: list[str]) -> list[str]:
    if not module_exists(module):
        return [f"no module {module}"]
    problems = override_problems(module, args) + flag_problems(module_entry_file(module), args)
    return [f"python -m {module}: {p}" for p in problems]


@functools.cache
def make_targets() -> frozenset[str]:
    return frozenset(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))


def module_exists(module: str) -> bool:
    if module.split(".")[0] in PACKAGES:
        return module_entry_file(module) is not None
    return importlib.util.find_spec(module.split(".")[0]) is not None  # imports nothing


def module_entry_file(module: str) -> Path | None:
    base = ROOT / module.replace(".", "/")
    if (base / "__main__.py").is_file():
        return base / "__main__.py"
    return module_file(module)


# ---------------------------------------------------------------- config keys


def field_types(annotation: Any) -> list[Any]:
    """The types a field may hold: Optional, unions and Annotated unwrapped."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return field_types(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [t for a in get_args(annotation) for t in field_types(a)]
    return [annotation]


def schema_accepts(model: type[BaseModel], parts: list[str]) -> bool:
    """Whether the dotted key `parts` is a field of `model` (any depth, through sub-models)."""
    if not parts or model.model_config.get("extra") == "allow":
        return True
    field = model.model_fields.get(parts[0])
    if field is None:
        return False
    rest = parts[1:]
    for kind in field_types(field.annotation):
        if not rest or kind is Any or kind is dict or get_origin(kind) is dict:
            return True
        if isinstance(kind, type) and issubclass(kind, BaseModel) and schema_accepts(kind, rest):
            return True
    return False


def job_key_problem(key: str) -> str | None:
    from jobs.config import JobConfig

    if schema_accepts(JobConfig, key.split(".")):
        return None
    return f"{key} is not a field of the job config (jobs/config.py)"


def override_problems(module: str, args: list[str]) -> list[str]:
    keys = [m[1] for m in map(KEY_ARG.fullmatch, args) if m]
    if module == "tune.pipeline":
        keys = [k.removeprefix("job.") for k in keys if k.startswith("job.")]
    elif module not in JOB_SCHEMA_MODULES:
        return []
    problems = []
    for key in keys:
        problem = job_key_problem(key)
        if problem and module == "jobs.prepare":
            from jobs.data.prepare_config import PrepareConfig

            prepare_key = schema_accepts(PrepareConfig, key.split("."))
            problem = (
                None if prepare_key else f"{problem[:-1]}, nor of jobs/data/prepare_config.py)"
            )
        if problem:
            problems.append(problem)
    return problems


def code_span_key_problem(text: str) -> str | None:
    """A code span `section.key=value` whose section is one of the job config's."""
    from jobs.config import JobConfig

    match = KEY_ARG.fullmatch(text)
    if not match or "." not in match[1] or match[1].split(".")[0] not in JobConfig.model_fields:
        return None
    return job_key_problem(match[1])


# ---------------------------------------------------------------- flags and markers


@functools.cache
def parameters(file: Path) -> frozenset[str]:
    tree = ast.parse(file.read_text())
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
    return frozenset(a.arg for f in functions for a in f.args.args + f.args.kwonlyargs)


@functools.cache
def cli_names(file: Path) -> tuple[str, frozenset[str]]:
    """The source of the file and of the repository modules it imports (where its CLI may live),
    and every function parameter in them (typer's options)."""
    files = [file]
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported = module_file(node.module)
            if imported and node.module.split(".")[0] in PACKAGES:
                files.append(imported)
    source = "\n".join(f.read_text() for f in files)
    return source, frozenset().union(*map(parameters, files))


def flag_problems(file: Path | None, args: list[str]) -> list[str]:
    if file is None:
        return []
    source, params = cli_names(file)
    problems = []
    for arg in args:
        flag = arg.split("=")[0]
        if not re.fullmatch(r"--[a-z][a-z0-9-]*", flag) or flag == "--help":
            continue
        name = flag[2:].replace("-", "_")
        if (
            f'"{flag}"' not in source
            and name not in params
            and name.removeprefix("no_") not in params
        ):
            problems.append(f"{flag} is not an option of {file.relative_to(ROOT)}")
    return problems


def marker_problems(args: list[str], markers: set[str]) -> list[str]:
    """`pytest -m EXPR FILE...`: EXPR's markers are registered, and each FILE uses one it selects."""
    if "-m" not in args or args.index("-m") + 1 >= len(args):
        return []
    expression = args[args.index("-m") + 1]
    names = re.findall(r"\w+", expression)
    wanted = [
        n
        for i, n in enumerate(names)
        if n not in ("and", "or", "not") and names[i - 1 : i] != ["not"]
    ]
    problems = [
        f"pytest -m {expression}: {n} is not a registered marker"
        for n in names
        if n not in markers | {"and", "or", "not"}
    ]
    for file in (a for a in args if a.endswith(".py") and (ROOT / a).is_file()):
        source = (ROOT / file).read_text()
        if wanted and not any(f"mark.{n}" in source for n in wanted):
            problems.append(
                f"pytest -m {expression} {file}: selects nothing (no test marked {expression})"
            )
    return problems


# ---------------------------------------------------------------- the tests


def doc_problems(doc: Path, markers: set[str]) -> list[str]:
    text = doc.read_text()
    problems = fence_problems(text) + link_problems(doc, text)
    pieces = list(snippets(text))
    for snippet in pieces:
        problems += path_problems(doc, snippet)
        if snippet.kind == "code":
            found = dotted_name_problem(snippet.text) or code_span_key_problem(snippet.text)
            problems += [f"{snippet.line}: {found}"] if found else []
    for command in logical_lines(pieces):
        problems += command_problems(command, markers)
    for snippet in pieces:
        if snippet.kind == "prose":
            for module in re.findall(r"python3? -m ([\w.]+)", snippet.text):
                problems += [] if module_exists(module) else [f"{snippet.line}: no module {module}"]
    return sorted(set(problems), key=lambda p: int(p.split(":")[0]))


def test_there_are_docs_to_check():
    names = {str(d.relative_to(ROOT)) for d in DOCS}
    assert {"README.md", "jobs/README.md", "serve/README.md", "tune/README.md"} <= names


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_says_what_is_true(doc, pytestconfig):
    markers = {m.split(":")[0].strip() for m in pytestconfig.getini("markers")}
    problems = doc_problems(doc, markers)
    where = doc.relative_to(ROOT)
    assert not problems, "\n".join(f"{where}:{p}" for p in problems)


def test_the_readmes_agree_on_one_registry():
    """The registry the CLI writes is the one configs/serve.yaml serves."""
    front = (ROOT / "README.md").read_text()
    assert "export RAYFT_REGISTRY=runs/registry" in front
    assert "registry: runs/registry" in (ROOT / "configs/serve.yaml").read_text()

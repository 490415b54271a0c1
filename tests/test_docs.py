"""The docs show what works: commands, code and links in README.md, docs/*.md and
benchmarks/README.md, checked as written.

- Every `dni-mesh ...` command in a ```bash block parses with the real command line parser;
  its topology file loads with its `--set` overrides (and its `--name` names a node);
  `dni-mesh validate ...` and `dni-mesh ... --help` are run. A file that is not in the
  repository must be a block of the same page whose first line names it (`# my_mesh.yaml`):
  the page's named blocks are written to a scratch folder, and the command runs there.
- `python -m benchmarks.X --flag ...` names a benchmark module that has those flags;
  `python -m pytest ... PATH` names test files that exist.
- Every ```yaml block that is a whole topology validates; every other one is valid YAML. Every
  ```python block compiles, and the ones that need no data set or training are run.
- Every relative link points to an existing file, and its #anchor to a heading of that page.
- docs/cli.md names every subcommand and every flag that `dni-mesh --help` has.
- README.md stays within 300 lines.

Nothing here trains, downloads or needs a network: the whole file takes seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from dni_mesh import cli
from dni_mesh.topology import load_topology

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
README_MAX_LINES = 300
DATA_DIR = os.path.abspath(os.environ.get("DNI_MESH_DATA") or ROOT.parent / "shared" / "data")
# Python blocks that train, read a data set or start processes are only compiled.
EXPENSIVE = re.compile(r"MNIST\(|\brun\(|ChainTrainer\(|train_epoch")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence
    lang: str
    text: str

    @property
    def name(self) -> str | None:
        """The file a block stands for, from a first line like `# mynodes/layers.py`."""
        first = self.text.split("\n", 1)[0].strip()
        found = re.fullmatch(r"#\s*([\w./-]+\.(?:py|yaml|yml))", first)
        return found.group(1) if found else None

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    found, lang, start, lines = [], None, 0, []
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        fence = re.match(r"^\s*```(\S*)\s*$", line)
        if fence and lang is None:
            lang, start, lines = fence.group(1) or "text", number, []
        elif fence and fence.group(1) == "":
            found.append(Block(page, start, lang, "\n".join(lines) + "\n"))
            lang = None
        elif lang is not None:
            lines.append(line)
    return found


ALL_BLOCKS = [block for page in PAGES for block in blocks(page)]


@dataclass(frozen=True)
class Command:
    block: Block
    env: tuple[tuple[str, str], ...]
    argv: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.block}: {' '.join(self.argv)}"


def commands(block: Block) -> list[Command]:
    """The shell commands of a bash block: continuation lines joined, `&&` chains split,
    comments dropped, `VAR=value` prefixes and `export VAR=value` lines kept as environment."""
    found, exported = [], {}
    for logical in block.text.replace("\\\n", " ").splitlines():
        for part in logical.split("&&"):
            words = shlex.split(part, comments=True)
            if words[:1] == ["export"]:
                exported.update(w.split("=", 1) for w in words[1:] if "=" in w)
                continue
            env = dict(exported)
            while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
                key, value = words.pop(0).split("=", 1)
                env[key] = value
            if words:
                found.append(Command(block, tuple(env.items()), tuple(words)))
    return found


ALL_COMMANDS = [c for block in ALL_BLOCKS if block.lang in ("bash", "sh") for c in commands(block)]
MESH_COMMANDS = [c for c in ALL_COMMANDS if c.argv[0] == "dni-mesh"]


def ids(items: list) -> list[str]:
    return [str(item) for item in items]


@pytest.fixture(autouse=True)
def _data(monkeypatch):
    """As the docs say: DNI_MESH_DATA names the data; relative paths from the repository root."""
    monkeypatch.setenv("DNI_MESH_DATA", DATA_DIR)
    monkeypatch.chdir(ROOT)


def workdir(command: Command, scratch: Path) -> Path:
    """Where the command runs: the repository root, or a scratch folder that holds the named
    blocks of its page when it uses a file the repository does not have."""
    files = [a for a in command.argv if a.endswith((".yaml", ".yml"))]
    if all((ROOT / f).exists() for f in files):
        return ROOT
    named = {b.name: b for b in ALL_BLOCKS if b.page == command.block.page and b.name}
    missing = [f for f in files if not (ROOT / f).exists() and f not in named]
    assert not missing, f"{command}: {missing} is neither in the repository nor a named block of the page"
    for name, block in named.items():
        (scratch / name).parent.mkdir(parents=True, exist_ok=True)
        (scratch / name).write_text(block.text)
    return scratch


def run_cli(argv: list[str]) -> tuple[int, str]:
    """`dni-mesh ARGS` in this process (one torch import for all of them): exit code, output."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = cli.main(argv)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    return code, out.getvalue()


@pytest.mark.parametrize("command", MESH_COMMANDS, ids=ids(MESH_COMMANDS))
def test_mesh_commands_run_as_written(command, tmp_path, monkeypatch):
    argv = list(command.argv[1:])
    for key, value in command.env:  # as written, from the repository root
        monkeypatch.setenv(key, str(ROOT / value) if key == "DNI_MESH_DATA" else value)
    if "--help" in argv or "-h" in argv or not argv:
        code, output = run_cli(argv or ["--help"])
        assert code == 0 and "usage: dni-mesh" in output, f"{command}:\n{output}"
        return
    try:
        args = cli.parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{command}: the command line parser refuses it")
    if args.command == "plot":
        return  # its run folders are what the commands shown before it write
    monkeypatch.chdir(workdir(command, tmp_path))
    if args.command == "keys":
        code, output = run_cli(argv)
        assert code == 0, f"{command}:\n{output}"
        return
    if args.command == "validate":
        code, output = run_cli(argv)
        assert code == 0, f"{command}:\n{output}"
        assert "nodes (in topological order):" in output, output
        return
    topology = load_topology(args.topology, args.overrides)  # what run, node and bench read first
    if args.command == "node":
        assert args.name in topology.nodes, f"{command}: no node {args.name!r}"


PYTHON_COMMANDS = [c for c in ALL_COMMANDS if c.argv[0] in ("python", "python3")
                   and c.argv[1:3] != ("-m", "venv")]


@pytest.mark.parametrize("command", PYTHON_COMMANDS, ids=ids(PYTHON_COMMANDS))
def test_python_commands_name_what_exists(command):
    argv = list(command.argv[1:])
    if argv[:2] == ["-m", "pytest"]:
        paths = [a for a in argv[2:] if not a.startswith("-")]
        assert all((ROOT / p.split("::")[0]).exists() for p in paths), command
        return
    if argv[0] == "-m":
        source = ROOT / (argv[1].replace(".", "/") + ".py")
        flags = argv[2:]
    else:
        source, flags = ROOT / argv[0], argv[1:]
    assert source.exists(), f"{command}: no {source.relative_to(ROOT)}"
    text = source.read_text()
    for flag in (f.split("=")[0] for f in flags if f.startswith("--")):
        assert f'"{flag}"' in text, f"{command}: {source.name} has no {flag} option"


def test_every_shown_command_is_checked():
    """A bash block holds only commands this file knows how to check (or to leave alone)."""
    known = ("dni-mesh", "python", "python3", "pip", ".", "source")
    unknown = [str(c) for c in ALL_COMMANDS if c.argv[0] not in known]
    assert not unknown, "commands the docs show but no test checks:\n" + "\n".join(unknown)


def test_the_quick_start_matches_ci():
    """.ci/run installs and tests the way the README's Quick start does: the same torch, the
    project with (at least) the README's extras, the same test command."""
    ci = [shlex.split(line, comments=True) for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    readme = [list(c.argv) for c in ALL_COMMANDS if c.block.page.name == "README.md"]
    torch = [w for w in ci if w[:2] == ["pip", "install"] and w[2:3] and w[2].startswith("torch")]
    assert torch and torch[0] in readme, f"README's Quick start does not install {torch}"
    extras = {tuple(w) for w in readme if w[:3] == ["pip", "install", "-e"]}
    assert len(extras) == 1, f"README's Quick start installs the project {len(extras)} times"
    shown = set(re.findall(r"\w+", next(iter(extras))[3].partition("[")[2]))
    installed = {e for w in ci if w[:3] == ["pip", "install", "-e"]
                 for e in re.findall(r"\w+", w[3].partition("[")[2])}
    assert "test" in shown and shown <= installed, (shown, installed)
    assert ["python", "-m", "pytest", "-q"] in ci and ["python", "-m", "pytest", "-q"] in readme


YAML_BLOCKS = [b for b in ALL_BLOCKS if b.lang in ("yaml", "yml")]


@pytest.mark.parametrize("block", YAML_BLOCKS, ids=ids(YAML_BLOCKS))
def test_yaml_blocks_are_valid(block, tmp_path):
    data = yaml.safe_load(block.text)
    if not (isinstance(data, dict) and {"data", "nodes", "edges"} <= set(data)):
        return  # a fragment: valid YAML is all it can be
    for other in ALL_BLOCKS:  # the node packages a named topology imports
        if other.page == block.page and other.name:
            (tmp_path / other.name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / other.name).write_text(other.text)
    path = tmp_path / (block.name or "block.yaml")
    path.write_text(block.text)
    load_topology(path)


PYTHON_BLOCKS = [b for b in ALL_BLOCKS if b.lang == "python"]


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=ids(PYTHON_BLOCKS))
def test_python_blocks_compile_and_cheap_ones_run(block, tmp_path, monkeypatch):
    code = compile(block.text, str(block), "exec")
    if block.name or EXPENSIVE.search(block.text):
        return  # a file to save, or a training run: compiling is what fits here
    with contextlib.redirect_stdout(io.StringIO()):
        exec(code, {"__name__": "__docs__"})


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = page.read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6}\s+(.+)$", text, flags=re.M):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


LINKS = [(page, target) for page in PAGES
         for target in LINK.findall(re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S))
         if not re.match(r"[a-z]+:", target)]


@pytest.mark.parametrize("page,target", LINKS, ids=[f"{p.relative_to(ROOT)}->{t}" for p, t in LINKS])
def test_relative_links_point_to_what_exists(page, target):
    path, _, anchor = target.partition("#")
    file = (page.parent / path).resolve() if path else page
    assert file.exists(), f"{page.relative_to(ROOT)}: {target}: no such file"
    if anchor and file.suffix == ".md":
        assert anchor in anchors(file), (f"{page.relative_to(ROOT)}: {target}: no heading with "
                                         f"that anchor in {file.relative_to(ROOT)}")


def test_cli_reference_names_every_command_and_flag():
    text = (ROOT / "docs" / "cli.md").read_text()
    top = cli.parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, parser in sub.choices.items():
        if f"## `dni-mesh {name}`" not in text:
            missing.append(f"section for dni-mesh {name}")
        flags = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
        missing += [f"dni-mesh {name} {flag}" for flag in flags
                    if flag != "--help" and f"`{flag}" not in text]
    assert not missing, "docs/cli.md does not document: " + ", ".join(missing)


def test_the_entry_point_runs():
    """`dni-mesh` as installed (the in-process checks above bypass the console script)."""
    result = subprocess.run(["dni-mesh", "--help"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    assert result.returncode == 0 and "usage: dni-mesh" in result.stdout, result.stderr


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES})"

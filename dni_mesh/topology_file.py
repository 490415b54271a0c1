"""The raw layer of a topology file: YAML text, `--set` overrides and the schema of its keys.

Kept apart from `dni_mesh.topology`, which gives the file its meaning (graph, ports, imports),
because everything here is about *where* a setting was written: the line of each key, which
`--set` produced a value, and precise messages for wrong types and unknown keys. `topology` asks
`RawTopology.error` for located errors and never looks at YAML itself.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

Key = tuple[str | int, ...]
M = TypeVar("M", bound=BaseModel)


class TopologyError(ValueError):
    """The one error a topology file produces; `str()` reads "file:line: key: message"."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None,
                 line: int | None = None, column: int | None = None) -> None:
        super().__init__(message)
        self.message, self.file, self.key, self.line, self.column = message, file, key, line, column

    def __str__(self) -> str:
        where = "".join(f":{n}" for n in (self.line, self.column) if n is not None)
        parts = [f"{self.file}{where}" if self.file else "", self.key or "", self.message]
        return ": ".join(p for p in parts if p)


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` and `1.0e4` as floats.

    PyYAML follows YAML 1.1, where a float needs a dot and a signed exponent, so `lr: 1e-3`
    would silently be the *string* "1e-3"; YAML 1.2 (and every user) reads a number.
    """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"))


def parse_value(text: str) -> Any:
    """A `--set` value, read with the same rules as the file (so `lr=1e-3` is a float)."""
    return yaml.load(text, Loader=_Loader)


# --- the schema: strict types (no "3" -> 3, no true -> 1), unknown keys rejected --------------

Mode = Literal["backprop", "dni", "cdni", "bp_lambda", "delayed"]
Time = Literal["bptt", "dni"]
Port = Annotated[int, Field(ge=0, le=65535)]  # 0: a free port, chosen when the node binds
PositiveInt = Annotated[int, Field(ge=1)]
NonNegative = Annotated[float, Field(ge=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class OptimizerFile(BaseModel):
    """Keys other than name and lr are passed to the torch optimizer as keyword arguments."""

    model_config = ConfigDict(strict=True, extra="allow")
    name: Literal["adam", "sgd"]  # what dni_mesh.synthetic.make_optimizer builds
    lr: Annotated[float, Field(gt=0)]


class SyntheticGradientFile(_Strict):
    hidden: Annotated[int, Field(ge=0)] = 0
    width: PositiveInt = 1024
    channels: PositiveInt = 128
    kernel_size: PositiveInt = 5
    conditioned: bool | None = None  # None: follows the mode (cdni conditions on labels)
    kind: Literal["auto", "mlp", "linear", "conv"] = "auto"
    scale: float = 1.0
    target: Literal["bootstrap", "backprop"] = "bootstrap"
    gate: bool = False  # scale each synthetic update's learning rate by what M explains
    optimizer: OptimizerFile = Field(default_factory=lambda: OptimizerFile(name="adam", lr=1e-4))


class SyntheticInputFile(_Strict):
    """A node's synthetic input I(x) (complete unlock, dni_mesh.synthetic.SyntheticInput)."""
    hidden: Annotated[int, Field(ge=0)] = 2
    width: PositiveInt = 256
    optimizer: OptimizerFile = Field(default_factory=lambda: OptimizerFile(name="adam", lr=1e-3))


class RestartFile(_Strict):
    """How often the launcher restarts a node that died (dni_mesh.launch)."""
    max: Annotated[int, Field(ge=0)] = 0  # 0: never; a death fails the run


class RayFile(_Strict):
    """Where the Ray launcher places a node (dni_mesh.ray_launcher): the Ray resources its actor
    holds, so Ray puts it on a Ray node that has them. None: the node's `threads` CPUs, and one
    GPU on a cuda device."""
    num_cpus: NonNegative | None = None
    num_gpus: NonNegative | None = None
    resources: dict[str, NonNegative] = Field(default_factory=dict)  # custom Ray resources


class SettingsFile(_Strict):
    """Per-node settings: `defaults` sets them for every node, a node may override any."""

    optimizer: OptimizerFile = Field(default_factory=lambda: OptimizerFile(name="adam", lr=3e-4))
    synthetic_gradient: SyntheticGradientFile = Field(default_factory=SyntheticGradientFile)
    device: Annotated[str, Field(pattern=r"^(cpu|cuda|cuda:[0-9]+)$")] = "cpu"
    threads: PositiveInt = 1
    window: PositiveInt = 1
    bp_lambda: Annotated[float, Field(ge=0, le=1)] = 1.0
    time: Time | None = None  # a recurrent module, and what crosses its chunk boundaries
    tick: PositiveInt = 1  # the node steps once every `tick` seqs (a head)
    restart: RestartFile = Field(default_factory=RestartFile)
    ray: RayFile | None = None  # None: its host's `ray`


class NodeFile(SettingsFile):
    role: Literal["source", "stage", "head"] | None = None  # None: a stage
    module: str | None = None
    args: dict[str, Any] = Field(default_factory=dict)
    objective: str | None = None  # a head's objective class; None: the labels' default
    objective_args: dict[str, Any] = Field(default_factory=dict)
    host: str | None = None
    port: Port | None = None
    synthetic_input: SyntheticInputFile | None = None  # None: the node waits for its input


class DataFile(_Strict):
    source: str
    args: dict[str, Any] = Field(default_factory=dict)
    batch_size: PositiveInt = 256
    epochs: PositiveInt = 1
    eval_every: Annotated[int, Field(ge=0)] = 1
    data_dir: str | None = None
    limit: PositiveInt | None = None


class HostFile(_Strict):
    address: str
    base_port: Port = 5600
    ray: RayFile | None = None  # for every node on this host that has no `ray` of its own


class LinkFile(_Strict):
    delay_ms: NonNegative = 0.0
    jitter_ms: NonNegative = 0.0
    bandwidth_mbps: Annotated[float, Field(gt=0)] | None = None


class EdgeFile(_Strict):
    src: str = Field(alias="from")
    dst: str = Field(alias="to")
    mode: Mode | None = None  # None: the mesh-wide mode
    gather: Literal["latest", "stack"] = "latest"  # into a node with tick > 1


class CheckpointFile(_Strict):
    """When each node saves its state (dni_mesh.checkpoint.CheckpointPolicy)."""
    every: Annotated[int, Field(ge=0)] = 200  # seqs between saves; 0: only after evaluations
    at_evaluation: bool = True


class CurveFile(_Strict):
    keys: str  # the folder `dni-mesh keys` wrote; relative to the topology file's folder


class SecurityFile(_Strict):
    curve: CurveFile | None = None  # None: no authentication, no encryption


class TopologyFile(_Strict):
    """The top level. Sections whose entries need their own key in errors stay raw here."""

    name: str | None = None  # None: the file's stem
    mode: Mode = "dni"
    seed: int = 0
    data: DataFile
    defaults: dict[str, Any] = Field(default_factory=dict)
    transport: dict[str, Any] = Field(default_factory=dict)
    checkpoint: CheckpointFile = Field(default_factory=CheckpointFile)
    security: SecurityFile = Field(default_factory=SecurityFile)
    links: dict[str, dict[str, Any]] = Field(default_factory=dict)
    nodes: dict[str, dict[str, Any]]
    edges: list[Any]
    hosts: dict[str, HostFile] = Field(
        default_factory=lambda: {"local": HostFile(address="127.0.0.1")})


def unknown(name: object, known: Sequence[str], what: str = "key") -> str:
    """"unknown key 'epoch' (did you mean 'epochs'? known: ...)": the likely typo, then all."""
    close = difflib.get_close_matches(str(name), list(known), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown {what} {name!r} ({hint}known: {', '.join(known) or 'none'})"


def _known_keys(model: type[BaseModel], loc: Sequence[str | int]) -> list[str]:
    """The keys a model accepts at `loc`, to suggest the one a typo meant."""
    annotation: Any = model
    for part in loc:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            by_key = {f.alias or n: f for n, f in annotation.model_fields.items()}
            annotation = by_key[str(part)].annotation
        else:  # dict[str, X] or list[X]: step to X
            annotation = get_args(annotation)[-1]
        if get_origin(annotation) in (Union, UnionType):  # X | None: step to X
            annotation = next(a for a in get_args(annotation) if a is not type(None))
    return [f.alias or n for n, f in annotation.model_fields.items()]


def _explain(model: type[BaseModel], error: dict[str, Any]) -> str:
    if error["type"] == "missing":
        return "required key missing"
    if error["loc"][-1:] == ("[key]",):
        return (f"key {error['input']!r} must be a string (quote it: YAML reads unquoted numbers, "
                "yes/no and on/off as non-strings)")
    if error["type"] == "extra_forbidden":
        return unknown(error["loc"][-1], _known_keys(model, error["loc"][:-1]))
    msg = error["msg"]
    return f"{msg[0].lower()}{msg[1:]}, got {error['input']!r}"


# --- reading the file ---------------------------------------------------------------------------

@dataclass(frozen=True)
class RawTopology:
    """The file's mapping after `--set`, plus what it takes to point at any key in it."""

    data: dict[str, Any]
    file: str  # as the user wrote it, so errors show a path they recognise
    lines: dict[Key, int]  # 1-based line of every key and list item in the file
    overrides: tuple[tuple[Key, str], ...]  # (path, the --set text) in order

    def error(self, key: Key, message: str) -> TopologyError:
        """A TopologyError at `key`: the line of the deepest part of it written in the file,
        or the `--set` that wrote it (a file line would point at the value it replaced)."""
        dotted = ".".join(map(str, key)) or None
        for path, text in reversed(self.overrides):
            if key[:len(path)] == path:
                return TopologyError(f"{message} (from --set {text})", file=self.file, key=dotted)
        line = next((self.lines[key[:n]] for n in range(len(key), 0, -1) if key[:n] in self.lines),
                    None)
        return TopologyError(message, file=self.file, key=dotted, line=line)

    def check(self, model: type[M], value: Any, key: Key) -> M:
        """Validate `value` (found at `key`) against `model`. The first problem is the error, an
        unknown key before all others: a typo also makes the key it meant look missing."""
        try:
            return model.model_validate(value)
        except ValidationError as exc:
            first = min(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
            loc = tuple(first["loc"])
            at = loc[:-2] if loc[-1:] == ("[key]",) else loc  # [key] follows the key, not a path
            raise self.error(key + at, _explain(model, first)) from None


def read_topology(path: str | Path, overrides: Sequence[str] = ()) -> RawTopology:
    """Parse the YAML at `path` (safe loading only) and apply `--set dotted.key=value` strings."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TopologyError(f"cannot read the file: {exc}", file=file) from None
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        lines = _lines(node, file)
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        message = "; ".join(filter(None, (exc.context, exc.problem))) or "invalid YAML"
        raise TopologyError(message, file=file, line=mark and mark.line + 1,
                            column=mark and mark.column + 1) from None
    except yaml.YAMLError as exc:
        raise TopologyError(f"invalid YAML: {exc}", file=file) from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        got = "an empty file" if data is None else type(data).__name__
        raise TopologyError(f"expected a mapping of sections (name, data, nodes, ...), got {got}",
                            file=file)
    applied = tuple((_apply_override(data, text, file), text) for text in overrides)
    return RawTopology(data, file, lines, applied)


def _lines(root: yaml.Node | None, file: str) -> dict[Key, int]:
    """Map every key path to its 1-based line by walking the composed node tree. Duplicate keys
    are errors here: PyYAML would keep the last silently (two nodes named l1 become one)."""
    lines: dict[Key, int] = {}
    seen: set[int] = set()  # aliases may repeat (or contain) a node: walk each once

    def walk(node: yaml.Node, path: Key) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            children = [(k.value, k, v) for k, v in node.value
                        if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge"]
        elif isinstance(node, yaml.SequenceNode):
            children = [(i, item, item) for i, item in enumerate(node.value)]
        else:
            return
        for part, mark_node, value in children:
            key, line = path + (part,), mark_node.start_mark.line + 1
            if key in lines:
                raise TopologyError(f"duplicate key (first at line {lines[key]})", file=file,
                                    key=".".join(map(str, key)), line=line)
            lines[key] = line
            walk(value, key)

    if root is not None:
        walk(root, ())
    return lines


def _apply_override(data: dict[str, Any], text: str, file: str) -> Key:
    """Set one `dotted.key=value` in the raw mapping, creating missing mappings on the way."""
    dotted, sep, value = text.partition("=")
    path = tuple(part.strip() for part in dotted.split("."))
    if not sep or not all(path):
        raise TopologyError(f"--set {text!r}: expected dotted.key=value", file=file)
    try:
        parsed = parse_value(value)
    except yaml.YAMLError as exc:
        raise TopologyError(f"--set {text!r}: the value is not YAML: {exc}", file=file) from None
    target = data
    for depth, part in enumerate(path[:-1], 1):
        if target.get(part) is None:
            target[part] = {}
        if not isinstance(target[part], dict):
            crossed = ".".join(path[:depth])
            raise TopologyError(f"--set {text!r}: {crossed} is a {type(target[part]).__name__}, "
                                "not a mapping", file=file, key=crossed)
        target = target[part]
    target[path[-1]] = parsed
    return path

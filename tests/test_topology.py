"""Topology loading: a valid file resolves completely, and every broken one names file, key, line.

Node modules are written into tmp_path next to the topology (as a user keeps them), never taken
from nodes/, so these tests need no torch and stay fast.
"""

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from dni_mesh.topology import (EdgeSpec, LinkSpec, TopologyError, describe, load_topology,
                               resolve_import)

MODULE = """\
class Block:
    def __init__(self, d_in, d_out): ...
class Classifier:
    def __init__(self, d_in, classes): ...
class Merge:
    pass
class Data:
    pass
NOT_CALLABLE = 3
"""

VALID = """\
name: tiny
mode: cdni
seed: 7
data:
  source: meshmods.blocks:Data
  args: {n: 3}
  batch_size: 32
  epochs: 3
  data_dir: data
defaults:
  optimizer: {name: adam, lr: 3.0e-4}
  synthetic_gradient: {hidden: 1, width: 64, optimizer: {name: sgd, lr: 1e-3}}
  threads: 2
links:
  default: {delay_ms: 1}
  "l1 -> l2": {delay_ms: 10, bandwidth_mbps: 100}
nodes:
  source: {role: source}
  l1: {module: meshmods.blocks:Block, args: {d_in: 784, d_out: 16}}
  l2: {module: meshmods.blocks:Block, args: {d_in: 16, d_out: 16}, port: 5601,
       optimizer: {lr: 1.0e-3}}
  aux: {role: head, module: meshmods.blocks:Classifier, args: {d_in: 16, classes: 10}}
  head: {role: head, module: meshmods.blocks:Merge, device: "cuda:1"}
edges:
  - source -> l1
  - l1 -> l2
  - l1->aux
  - {from: l2, to: head, mode: backprop}
  - {from: l1, to: head}
"""


@pytest.fixture
def mesh(tmp_path: Path):
    """A folder holding a node package, like a user's project next to its topology file."""
    package = tmp_path / "meshmods"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "blocks.py").write_text(MODULE)
    yield tmp_path
    for name in ("meshmods", "meshmods.blocks"):  # the next test's tmp_path holds another copy
        sys.modules.pop(name, None)


def write(folder: Path, text: str) -> Path:
    path = folder / "mesh.yaml"
    path.write_text(text)
    return path


def edit(old: str, new: str, text: str = VALID) -> str:
    assert old in text, old
    return text.replace(old, new)


def line_of(text: str, snippet: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if snippet in line)


def test_valid_file_resolves(mesh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir("/")  # imports resolve against the file's folder, not the cwd
    topo = load_topology(write(mesh, VALID))
    assert (topo.name, topo.mode, topo.seed, topo.root) == ("tiny", "cdni", 7, mesh.resolve())
    assert list(topo.nodes) == ["source", "l1", "l2", "aux", "head"]
    assert topo.source == "source" and topo.heads == ["aux", "head"]

    # explicit ports first; the others count up from base_port in file order, skipping them
    ports = {name: node.port for name, node in topo.nodes.items()}
    assert ports == {"source": 5600, "l1": 5602, "l2": 5601, "aux": 5603, "head": 5604}
    assert topo.nodes["l2"].address == "tcp://127.0.0.1:5601"
    assert {node.host for node in topo.nodes.values()} == {"local"}

    l1, l2, head = topo.nodes["l1"], topo.nodes["l2"], topo.nodes["head"]
    assert l1.role == "stage" and l1.args == {"d_in": 784, "d_out": 16}
    assert l1.optimizer == {"name": "adam", "lr": 3.0e-4}
    assert l2.optimizer == {"name": "adam", "lr": 1.0e-3}  # deep merge: the node's lr, adam kept
    assert l1.synthetic_gradient["optimizer"] == {"name": "sgd", "lr": 1e-3}  # 1e-3 is a float
    assert l1.synthetic_gradient["hidden"] == 1 and l1.synthetic_gradient["width"] == 64
    assert (l1.threads, l1.device, head.device, l1.window) == (2, "cpu", "cuda:1", 1)

    # a node's mode is its out-edges' mode; cdni conditions its synthesizer on the labels
    assert (l1.mode, l2.mode, head.mode, topo.nodes["source"].mode) == ("cdni", "backprop",
                                                                        None, "cdni")
    assert l1.synthetic_gradient["conditioned"] is True
    assert l2.synthetic_gradient["conditioned"] is False

    assert topo.edges[2] == EdgeSpec("l1", "aux", "cdni") and topo.edges[2].name == "l1->aux"
    assert [e.src for e in topo.inputs("head")] == ["l2", "l1"]  # fan-in in edge order
    assert [e.dst for e in topo.outputs("l1")] == ["l2", "aux", "head"]
    assert topo.topological_order() == ["source", "l1", "l2", "aux", "head"]
    assert topo.links["l1->l2"] == LinkSpec(delay_ms=10, bandwidth_mbps=100)
    assert topo.links["l2->head"] == LinkSpec(delay_ms=1)

    data = topo.data
    assert (data.source, data.args, data.batch_size, data.epochs) == (
        "meshmods.blocks:Data", {"n": 3}, 32, 3)
    assert (data.eval_every, data.limit, data.data_dir) == (1, None, mesh.resolve() / "data")


def test_overrides_apply_before_validation(mesh: Path) -> None:
    topo = load_topology(write(mesh, VALID), [
        "data.epochs=1", "nodes.l1.optimizer.lr=0.01", "defaults.synthetic_gradient.hidden=0",
        "data.limit=2"])
    assert topo.data.epochs == 1 and topo.data.limit == 2
    assert topo.nodes["l1"].optimizer == {"name": "adam", "lr": 0.01}
    assert {n.synthetic_gradient["hidden"] for n in topo.nodes.values()} == {0}


def test_resolve_import_uses_the_folder_then_restores_sys_path(mesh: Path) -> None:
    before = list(sys.path)
    block = resolve_import("meshmods.blocks:Block", mesh)
    assert block.__name__ == "Block" and Path(sys.modules[block.__module__].__file__).parent \
        == mesh / "meshmods"
    assert sys.path == before
    with pytest.raises(TopologyError, match="not callable"):
        resolve_import("meshmods.blocks:NOT_CALLABLE", mesh)
    with pytest.raises(TopologyError, match="has no attribute 'Nope'"):
        resolve_import("meshmods.blocks:Nope", mesh)
    with pytest.raises(TopologyError, match="not an import path"):
        resolve_import("meshmods.blocks.Block", mesh)


def test_without_import_checks_aliases_still_expand(tmp_path: Path) -> None:
    text = edit("source: meshmods.blocks:Data", "source: mnist")
    topo = load_topology(write(tmp_path, text), check_imports=False)  # meshmods is absent
    assert topo.data.source == "nodes.data:MNIST"


def test_hosts_place_nodes_and_ports(mesh: Path) -> None:
    hosts = "hosts:\n  a: {address: 10.0.0.1, base_port: 7000}\n  b: {address: 10.0.0.2}\n"
    text = edit("{role: source}", "{role: source, host: a}", edit("port: 5601,", "host: b,"))
    with pytest.raises(TopologyError) as ambiguous:  # two hosts, none named local
        load_topology(write(mesh, text + hosts))
    assert ambiguous.value.key == "nodes.l1.host"
    assert "none is named 'local'" in ambiguous.value.message

    # nodes without a host go to "local"; each host counts ports from its own base_port
    text = edit("host: b,", "host: local,", text) + edit("  b:", "  local:", hosts)
    topo = load_topology(write(mesh, text))
    assert topo.nodes["source"].address == "tcp://10.0.0.1:7000"
    assert [topo.nodes[n].address for n in ("l1", "l2", "aux")] == [
        "tcp://10.0.0.2:5600", "tcp://10.0.0.2:5601", "tcp://10.0.0.2:5602"]
    assert topo.hosts["a"].base_port == 7000 and topo.nodes["l1"].host == "local"


def test_describe_shows_the_resolved_mesh(mesh: Path) -> None:
    text = describe(load_topology(write(mesh, VALID)))
    assert "meshmods.blocks:Block(d_in=784, d_out=16)" in text
    assert "tcp://127.0.0.1:5604" in text
    assert re.search(r"\n  l2 -> head +backprop  link: delay 1 ms", text)
    assert "delay 10 ms" in text and "batch_size 32" in text


def test_describe_shows_clock_rates_gathers_and_recurrence() -> None:
    examples = Path(__file__).resolve().parent.parent / "examples"
    text = describe(load_topology(examples / "two_clocks.yaml", check_imports=False))
    assert re.search(r"\n  b +head .* loss +tick 4\n", text)
    assert text.endswith("\n  a -> b       cdni  gather stack")
    assert re.search(r"\n  a -> parity +cdni\n", text)  # parity ticks every seq: no gather shown
    text = describe(load_topology(examples / "ptb_char_dni.yaml", check_imports=False))
    assert re.search(r"\n  l1 +stage .* time dni\n", text)
    assert not re.search(r"\n  source .* time ", text)


def test_no_node_may_take_the_launchers_name(mesh: Path) -> None:
    path = write(mesh, VALID)
    with pytest.raises(TopologyError, match=r"nodes\.launcher: no node may be named 'launcher'"):
        load_topology(path, ["nodes.launcher={module: 'meshmods.blocks:Block'}"])


def test_error_text_names_file_line_and_key(mesh: Path) -> None:
    text = edit("l1: {module: meshmods.blocks:Block", "l1: {module: nodes_nope:Block")
    path = write(mesh, text)
    with pytest.raises(TopologyError) as err:
        load_topology(path)
    assert str(err.value) == (f"{path}:{line_of(text, 'nodes_nope')}: nodes.l1.module: cannot "
                              "import 'nodes_nope': No module named 'nodes_nope'")
    assert isinstance(err.value, ValueError) and err.value.file == str(path)


def test_yaml_syntax_error_gives_line_and_column(tmp_path: Path) -> None:
    text = edit("  batch_size: 32", "  batch_size: [32")
    with pytest.raises(TopologyError) as err:
        load_topology(write(tmp_path, text))
    assert (err.value.line, err.value.column) == (line_of(text, "epochs: 3"), 9)
    assert str(err.value).startswith(f"{tmp_path / 'mesh.yaml'}:{err.value.line}:9: ")


# (case, [(old, new) edits to VALID], key, a snippet of the reported line (None: no line),
#  words in the message)
ADD_L9 = ("  aux: {", "  l9: {module: meshmods.blocks:Block}\n  aux: {")
INVALID = [
    ("unknown node in an edge", [("  - l1 -> l2", "  - l1 -> l3")], "edges.1", "l1 -> l3",
     "edge 'l1 -> l3': unknown node 'l3' (known: source, l1, l2, aux, head)"),
    ("misspelt node in an edge", [("  - l1->aux", "  - l1->aus")], "edges.2", "l1->aus",
     "unknown node 'aus' (did you mean 'aux'? known: source, l1, l2, aux, head)"),
    ("cycle", [("  - l1 -> l2\n", "  - l1 -> l2\n  - l2 -> l1\n")], "edges.2", "l2 -> l1",
     "cycle: l1 -> l2 -> l1"),
    ("self loop", [("  - l1 -> l2\n", "  - l1 -> l2\n  - l2 -> l2\n")], "edges.2", "l2 -> l2",
     "cycle: l2 -> l2"),
    ("duplicate port", [("aux: {role: head,", "aux: {port: 5601, role: head,")],
     "nodes.aux.port", "aux:",
     "port 5601 on 127.0.0.1 (host 'local') is taken by both 'l2' and 'aux'"),
    ("module does not import", [("meshmods.blocks:Classifier", "meshmods.nope:Classifier")],
     "nodes.aux.module", "aux:", "cannot import 'meshmods.nope': No module named"),
    ("data source lacks the attribute", [("meshmods.blocks:Data", "meshmods.blocks:Nope")],
     "data.source", "source: meshmods", "has no attribute 'Nope'"),
    ("wrong type", [("batch_size: 32", "batch_size: abc")], "data.batch_size", "batch_size",
     "valid integer, got 'abc'"),
    ("wrong type in a node", [("optimizer: {lr: 1.0e-3}", "optimizer: {lr: [1]}")],
     "nodes.l2.optimizer.lr", "optimizer: {lr: [1]}", "valid number, got [1]"),
    ("bool is not an int", [("seed: 7", "seed: yes")], "seed", "seed", "got True"),
    ("misspelt section", [("data:\n  source", "dat:\n  source")], "dat", "dat:",
     "did you mean 'data'?"),
    ("missing edges", [(VALID[VALID.index("edges:"):], "")], "edges", None,
     "required key missing"),
    ("missing module", [("l1: {module: meshmods.blocks:Block, ", "l1: {")], "nodes.l1.module",
     "l1:", "required key missing"),
    ("unknown key", [("epochs: 3", "epoch: 3")], "data.epoch", "epoch:",
     "did you mean 'epochs'?"),
    ("unknown nested key", [("hidden: 1,", "hiden: 1,")], "defaults.synthetic_gradient.hiden",
     "hiden", "did you mean 'hidden'?"),
    ("unknown key in a host", [("edges:\n", "hosts:\n  local: {adress: 10.0.0.1}\nedges:\n")],
     "hosts.local.adress", "adress", "did you mean 'address'?"),
    ("unknown edge key", [("{from: l1, to: head}", "{from: l1, too: head}")], "edges.4.too",
     "too: head", "did you mean 'to'?"),
    ("mixed out-edge modes", [("  - l1->aux", "  - {from: l1, to: aux, mode: dni}")], "edges.2",
     "to: aux", "node 'l1' has out-edges with different modes (l1 -> l2: cdni, l1 -> aux: dni)"),
    ("unreachable node", [ADD_L9, ("  - source -> l1\n", "  - source -> l1\n  - l9 -> aux\n")],
     "nodes.l9", "l9:", "not reachable from the source 'source' (unreachable: l9)"),
    ("duplicate edge", [("  - l1->aux", "  - l1->aux\n  - l1 -> aux")], "edges.3",
     "  - l1 -> aux", "duplicate edge l1 -> aux (first at edges.2)"),
    ("duplicate node", [("  aux: {", "  l1: {}\n  aux: {")], "nodes.l1", "l1: {}",
     "duplicate key (first at line 19)"),
    ("second source", [("  aux: {", "  s2: {role: source}\n  aux: {")], "nodes.s2.role", "s2:",
     "second source"),
    ("head with an out-edge", [("  - l1 -> l2\n", "  - l1 -> l2\n  - aux -> l2\n")], "edges.2",
     "aux -> l2", "a head ('aux') has no outputs"),
    ("stage going nowhere", [ADD_L9, ("  - l1->aux", "  - l1->aux\n  - source -> l9")],
     "nodes.l9", "l9:", "has no out-edge"),
    ("source with a module", [("{role: source}", "{role: source, module: a:b}")],
     "nodes.source.module", "source: {", "the source has no module"),
    ("conditioned contradicts cdni", [("{hidden: 1,", "{conditioned: false, hidden: 1,")],
     "defaults.synthetic_gradient.conditioned", "conditioned",
     "False contradicts mode 'cdni' of node 'l1'"),
    ("link for a missing edge", [('"l1 -> l2"', '"l2 -> l1"')], "links.l2 -> l1", "l2 -> l1",
     "no such edge"),
    ("unknown host", [("port: 5601,", "host: far,")], "nodes.l2.host", "l2:",
     "unknown host 'far'"),
    ("name with a dot", [("  aux: {", "  a.b: {module: x:y}\n  aux: {")], "nodes.a.b", "a.b:",
     "must be letters, digits"),
    ("unquoted boolean name", [("  aux: {", "  on: {module: x:y}\n  aux: {")], "nodes", "nodes:",
     "key True must be a string"),
]


@pytest.mark.parametrize("case, edits, key, snippet, words", INVALID,
                         ids=[case[0] for case in INVALID])
def test_invalid_file_names_file_key_and_line(mesh: Path, case: str,
                                              edits: list[tuple[str, str]], key: str,
                                              snippet: str | None, words: str) -> None:
    text = VALID
    for old, new in edits:
        text = edit(old, new, text)
    path = write(mesh, text)
    with pytest.raises(TopologyError) as err:
        load_topology(path)
    assert (err.value.file, err.value.key) == (str(path), key)
    assert err.value.line == (snippet and line_of(text, snippet))
    assert words in err.value.message


def test_an_override_error_names_the_override(mesh: Path) -> None:
    with pytest.raises(TopologyError) as err:
        load_topology(write(mesh, VALID), ["nodes.l1.optimizer.lr=fast"])
    assert err.value.key == "nodes.l1.optimizer.lr" and err.value.line is None
    assert "(from --set nodes.l1.optimizer.lr=fast)" in str(err.value)
    with pytest.raises(TopologyError) as err:
        load_topology(write(mesh, VALID), ["data.batch_size.x=1"])
    assert err.value.key == "data.batch_size" and "is a int, not a mapping" in str(err.value)
    with pytest.raises(TopologyError, match="expected dotted.key=value"):
        load_topology(write(mesh, VALID), ["data.epochs"])


def test_unsafe_yaml_tags_are_refused(tmp_path: Path) -> None:
    text = VALID + "x: !!python/object/apply:os.system ['true']\n"
    with pytest.raises(TopologyError, match="could not determine a constructor"):
        load_topology(write(tmp_path, text))


@dataclass
class FakeTransportConfig:
    """Stands in for dni_mesh.transport's config, whose import would pull in torch."""

    sndhwm: int = 8
    rcvhwm: int = 8

    def __post_init__(self) -> None:
        if self.sndhwm < 1:
            raise ValueError("sndhwm must be at least 1")


def test_transport_keys_are_checked_against_its_config(mesh: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "dni_mesh.transport",
                        SimpleNamespace(TransportConfig=FakeTransportConfig))
    with pytest.raises(TopologyError) as err:
        load_topology(write(mesh, VALID + "transport: {sndhw: 4}\n"))
    assert err.value.key == "transport.sndhw" and "did you mean 'sndhwm'?" in err.value.message
    with pytest.raises(TopologyError, match="rejected by TransportConfig: sndhwm must be"):
        load_topology(write(mesh, VALID + "transport: {sndhwm: 0}\n"))
    topo = load_topology(write(mesh, VALID + "transport: {sndhwm: 4}\n"))
    assert topo.transport == {"sndhwm": 4}

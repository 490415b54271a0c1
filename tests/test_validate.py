"""`dni-mesh validate`: every module is built and dry-run on what its in-edges carry, and a mesh
that cannot run is refused with exit 2, naming the node at fault, its module and what it got.

The broken meshes take their modules and a tiny data source from a file written into tmp_path
(as a user keeps theirs), so they need no data set; most run `dni_mesh.cli.main` in-process to
import torch once, and one runs `python -m dni_mesh.cli validate` as a user does.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dni_mesh.build import build_core, load_plan, resolve_plan
from dni_mesh.cli import main
from dni_mesh.topology import TopologyError, load_topology

ROOT = Path(__file__).parents[1]
DATA = Path(os.environ.get("DNI_MESH_DATA", ROOT.parent / "shared" / "data")).resolve()

MYNODES = '''
import torch
from torch import nn


class Data:
    """A tiny data source: zero samples of `shape`, 10 classes."""
    num_classes = 10

    def __init__(self, split="train", batch_size=4, shuffle=True, seed=0, shape=(16,)):
        self.batch_size, self.sample_shape = batch_size, tuple(shape)

    def set_epoch(self, epoch):
        pass

    def __len__(self):
        return 1

    def __iter__(self):
        yield (torch.zeros(self.batch_size, *self.sample_shape),
               torch.zeros(self.batch_size, dtype=torch.int64))


class Conv(nn.Module):
    def __init__(self, c_in, c_out, pool=False):
        super().__init__()
        self.conv, self.pool = nn.Conv2d(c_in, c_out, 3, padding=1), pool

    def forward(self, x):
        x = torch.relu(self.conv(x))
        return nn.functional.max_pool2d(x, 2) if self.pool else x


class SkipMerge(nn.Module):
    """Fan-in: concatenates its inputs' channels (c_in lists them, in edge order), then a conv."""
    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = nn.Conv2d(sum(c_in), c_out, 3, padding=1)

    def forward(self, *inputs):
        return torch.relu(self.conv(torch.cat(inputs, dim=1)))


class Linear(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.linear(x.flatten(1))


class Half(Linear):
    """float16 weights: a float32 input does not fit them."""
    def __init__(self, d_in, d_out):
        super().__init__(d_in, d_out)
        self.half()


class Double(Linear):
    """Sends float64."""
    def __init__(self, d_in, d_out):
        super().__init__(d_in, d_out)
        self.double()

    def forward(self, x):
        return self.linear(x.double())


class AnyFloat(Linear):
    """Takes any floating input."""
    def forward(self, x):
        return self.linear(x.float())


class NoScored:
    """An objective that forgot `scored`: its head would fail at its first evaluation."""
    def loss(self, output, labels):
        return nn.functional.cross_entropy(output, labels)

    def correct(self, output, labels):
        return int((output.argmax(1) == labels).sum())


class Counted(Linear):
    built = 0

    def __init__(self, d_in, d_out):
        super().__init__(d_in, d_out)
        Counted.built += 1
'''


def mesh(nodes: dict, edges: list, mode: str = "dni", shape: tuple = (16,)) -> dict:
    return {"name": "v", "mode": mode, "seed": 1,
            "data": {"source": "checknodes:Data", "args": {"shape": list(shape)}, "batch_size": 4},
            "defaults": {"synthetic_gradient": {"hidden": 0}},
            "nodes": {"source": {"role": "source"}, **nodes}, "edges": edges,
            "hosts": {"local": {"address": "127.0.0.1", "base_port": 30000}}}


def chain(l1: str = "Linear", l2: str = "Linear", mode: str = "dni", **l2_settings) -> dict:
    """source -> l1 -> l2 -> head, 16 -> 8 -> 8 -> 10 features."""
    return mesh({"l1": {"module": f"checknodes:{l1}", "args": {"d_in": 16, "d_out": 8}},
                 "l2": {"module": f"checknodes:{l2}", "args": {"d_in": 8, "d_out": 8}, **l2_settings},
                 "head": {"role": "head", "module": "checknodes:Linear",
                          "args": {"d_in": 8, "d_out": 10}}},
                ["source -> l1", "l1 -> l2", "l2 -> head"], mode)


def skip_mesh(merged_channels: list[int]) -> dict:
    """Images 1x28x28: c1 (48x14x14) feeds p (48x7x7) and c2 (32x7x7), which fan in at c3."""
    return mesh({"c1": {"module": "checknodes:Conv", "args": {"c_in": 1, "c_out": 48, "pool": True}},
                 "p": {"module": "checknodes:Conv", "args": {"c_in": 48, "c_out": 48, "pool": True}},
                 "c2": {"module": "checknodes:Conv", "args": {"c_in": 48, "c_out": 32, "pool": True}},
                 "c3": {"module": "checknodes:SkipMerge",
                        "args": {"c_in": merged_channels, "c_out": 8}},
                 "head": {"role": "head", "module": "checknodes:Linear",
                          "args": {"d_in": 8 * 7 * 7, "d_out": 10}}},
                ["source -> c1", "c1 -> p", "c1 -> c2", "p -> c3", "c2 -> c3", "c3 -> head"],
                shape=(1, 28, 28))


def write(tmp_path: Path, topology: dict) -> Path:
    (tmp_path / "checknodes.py").write_text(MYNODES)  # the same text in every test: sys.modules
    path = tmp_path / "mesh.yaml"
    path.write_text(yaml.safe_dump(topology, sort_keys=False))
    return path


def validate(path: Path, capsys) -> tuple[int, str]:
    code = main(["validate", str(path)])
    captured = capsys.readouterr()
    return code, captured.err if code else captured.out


def test_fan_in_channel_mismatch_names_the_fan_in_node(tmp_path, capsys):
    code, err = validate(write(tmp_path, skip_mesh([48, 48])), capsys)
    assert code == 2
    assert ("nodes.c3.module: c3 (checknodes:SkipMerge) got inputs float32[2,48,7,7], "
            "float32[2,32,7,7]: RuntimeError") in err, err


def test_correct_fan_in_validates_with_every_output(tmp_path, capsys):
    code, out = validate(write(tmp_path, skip_mesh([48, 32])), capsys)
    assert code == 0, out
    rows = {line.split()[0]: line for line in out.splitlines() if "tcp://" in line}
    assert rows["c1"].endswith("-> float32[48,14,14]") and rows["c3"].endswith("-> float32[8,7,7]")
    assert rows["head"].endswith("-> float32[10]")


def test_float16_weights_name_the_node_that_has_them(tmp_path, capsys):
    code, err = validate(write(tmp_path, chain(l2="Half")), capsys)
    assert code == 2
    assert "nodes.l2.module: l2 (checknodes:Half) got inputs float32[2,8]: RuntimeError" in err, err


@pytest.mark.parametrize("mode, refused_by", [("dni", "its synthesizer (float32)"),
                                              ("backprop", "its consumer l2 (checknodes:Linear)")])
def test_float64_output_names_the_producer(tmp_path, capsys, mode, refused_by):
    code, err = validate(write(tmp_path, chain(l1="Double", mode=mode)), capsys)
    assert code == 2
    assert f"nodes.l1.module: l1 (checknodes:Double) sends float64[2,8], which {refused_by}" in err, \
        err


def test_float64_output_is_allowed_when_everything_on_it_takes_it(tmp_path, capsys):
    path = write(tmp_path, chain(l1="Double", l2="AnyFloat", mode="backprop"))
    code, out = validate(path, capsys)
    assert code == 0, out
    assert "-> float64[8]" in out


def test_missing_device_names_the_node_and_key(tmp_path, capsys):
    device = f"cuda:{torch.cuda.device_count()}"  # one past the last: absent on every machine
    code, err = validate(write(tmp_path, chain(device=device)), capsys)
    assert code == 2
    assert f"nodes.l2.device: node l2: device '{device}'" in err, err


def test_head_with_the_wrong_class_count_is_refused(tmp_path, capsys):
    topology = chain()
    topology["nodes"]["head"]["args"]["d_out"] = 7
    code, err = validate(write(tmp_path, topology), capsys)
    assert code == 2
    assert "nodes.head.module: head (checknodes:Linear) got inputs float32[2,8] and returned " \
           "float32[2,7]: a head gives [batch, 10] class scores" in err, err


def test_a_head_objective_is_dry_run_whole_and_built_where_named(tmp_path, capsys):
    topology = chain()
    topology["nodes"]["head"]["objective"] = "checknodes:NoScored"
    code, err = validate(write(tmp_path, topology), capsys)
    assert code == 2
    assert ("nodes.head.module: head (checknodes:Linear) got inputs float32[2,8] and returned "
            "float32[2,10], which the NoScored objective cannot take: AttributeError") in err, err
    topology["nodes"]["head"]["objective_args"] = {"column": 1}
    code, err = validate(write(tmp_path, topology), capsys)
    assert code == 2
    assert "nodes.head.objective: head's objective checknodes:NoScored with arguments " \
           "{'column': 1} cannot be built: TypeError" in err, err


def test_the_command_exits_2_naming_the_node(tmp_path):
    path = write(tmp_path, chain(l2="Half"))
    done = subprocess.run([sys.executable, "-m", "dni_mesh.cli", "validate", str(path)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2, done.stderr
    assert "l2 (checknodes:Half) got inputs float32[2,8]" in done.stderr


def test_run_refuses_a_broken_mesh_before_any_node_starts(tmp_path, forkserver):
    from dni_mesh.launch import run
    with pytest.raises(TopologyError, match=r"c3 \(checknodes:SkipMerge\) got inputs"):
        run(write(tmp_path, skip_mesh([48, 48])), run_dir=tmp_path / "run", live=False,
            forkserver=forkserver)
    assert not (tmp_path / "run" / "nodes.json").exists()


def test_a_node_with_the_plan_builds_only_its_own_module(tmp_path):
    topology = load_topology(write(tmp_path, chain(l1="Counted", l2="Counted")))
    plan = resolve_plan(topology)
    plan.save(tmp_path / "plan.json", topology)
    loaded = load_plan(tmp_path / "plan.json", topology)
    assert loaded == plan
    counted = sys.modules["checknodes"].Counted
    counted.built = 0
    core = build_core(topology, "l2", lambda: 0.0, loaded)
    assert counted.built == 1
    assert [(e.shape, e.dtype) for e in core.wiring.inputs] == [((8,), torch.float32)]


def test_a_plan_for_another_topology_is_refused(tmp_path):
    topology = load_topology(write(tmp_path, chain()))
    resolve_plan(topology).save(tmp_path / "plan.json", topology)
    other = load_topology(tmp_path / "mesh.yaml", ["nodes.l2.args.d_out=9"])
    with pytest.raises(TopologyError, match="the plan was made for") as refused:
        load_plan(tmp_path / "plan.json", other)
    assert "cannot read" not in str(refused.value)


@pytest.mark.skipif(not (DATA / "mnist").is_dir(), reason=f"MNIST not found under {DATA}")
@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_example_validates(example, capsys, monkeypatch):
    monkeypatch.setenv("DNI_MESH_DATA", str(DATA))
    code, out = validate(example, capsys)
    assert code == 0, out
    assert re.search(r"^  \S+ +head +.* -> float32\[", out, re.M), out  # a head with its scores

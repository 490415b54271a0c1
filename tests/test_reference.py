from dataclasses import replace
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dni_mesh.build import make_stage, node_seed
from dni_mesh.reference import ChainConfig, ChainNode, ChainTrainer
from dni_mesh.update import SyntheticGradient
from dni_mesh.synthetic import SyntheticGradientConfig
from nodes.conv import ConvBlock, ConvClassifier
from nodes.data import Blobs
from nodes.mlp import Block, Classifier

torch.set_num_threads(1)


def chain(mode: str, seed: int = 3, **overrides) -> ChainConfig:
    return ChainConfig(
        nodes=[ChainNode("l1", partial(Block, 16, 32)), ChainNode("l2", partial(Block, 32, 32)),
               ChainNode("head", partial(Classifier, 32, 4))],
        input_shape=(16,), num_classes=4, mode=mode, seed=seed,
        optimizer={"name": "adam", "lr": 0.01},
        synthetic_gradient=SyntheticGradientConfig(optimizer={"name": "adam", "lr": 0.001}),
        **overrides)


def train(trainer: ChainTrainer, source, epochs: int) -> ChainTrainer:
    for epoch in range(epochs):
        trainer.train_epoch(source, epoch)
    return trainer


def test_backprop_reference_equals_plain_pytorch_exactly():
    config, source = chain("backprop"), Blobs(seed=1)
    trainer = train(ChainTrainer(config), source, epochs=2)

    modules = []
    for node in config.nodes:
        torch.manual_seed(node_seed(config.seed, node.name))
        modules.append(node.make())
    net = nn.Sequential(*modules)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    losses = []
    for epoch in range(2):
        for x, y in source.iterate(epoch):
            loss = F.cross_entropy(net(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())

    assert trainer.losses == losses
    mesh_state = [t for s in trainer.stages for t in s.module.state_dict().values()]
    assert all(torch.equal(a, b) for a, b in zip(mesh_state, net.state_dict().values(), strict=True))


def test_bp_lambda_one_reproduces_backprop_exactly():
    source = Blobs(seed=1)
    locked = train(ChainTrainer(chain("backprop")), source, epochs=1)
    mixed = train(ChainTrainer(chain("bp_lambda", bp_lambda=1.0)), source, epochs=1)
    assert locked.losses == mixed.losses
    assert mixed.stages[0].stats.sg_fits == len(source)


@pytest.mark.parametrize("mode", ["dni", "cdni", "bp_lambda"])
def test_reference_is_deterministic_for_a_seed(mode):
    source = Blobs(seed=1, num_samples=256)
    first = train(ChainTrainer(chain(mode, bp_lambda=0.5)), source, epochs=2)
    second = train(ChainTrainer(chain(mode, bp_lambda=0.5)), source, epochs=2)
    other = train(ChainTrainer(chain(mode, seed=4, bp_lambda=0.5)), source, epochs=2)
    assert first.losses == second.losses and len(first.losses) == 2 * len(source)
    assert first.losses != other.losses


@pytest.mark.parametrize("mode", ["dni", "cdni"])
def test_dni_chain_learns_separable_blobs(mode):
    trainer = train(ChainTrainer(chain(mode)), Blobs(seed=1), epochs=4)
    result = trainer.evaluate(Blobs("test", seed=1, batch_size=128, shuffle=False))
    assert result.samples == 512 and result.accuracy > 0.9
    assert all(s.stats.sg_fits == s.stats.steps == 32 for s in trainer.stages[:-1])
    untrained = ChainTrainer(chain(mode)).stages[0].module.net[1].weight
    assert not torch.equal(untrained, trainer.stages[0].module.net[1].weight)


def test_modes_and_settings_can_differ_along_the_chain():
    config = chain("dni")
    config.nodes[1].mode = "backprop"
    config.nodes[1].optimizer = {"name": "sgd", "lr": 0.1}
    trainer = train(ChainTrainer(config), Blobs(seed=1, num_samples=128), epochs=1)
    l1, l2, _ = trainer.stages
    assert (l1.stats.sg_fits, l2.stats.sg_fits, l2.stats.steps) == (2, 0, 2)
    assert l1.synthesizer is not None and l2.synthesizer is None
    assert isinstance(l2.optimizer, torch.optim.SGD) and isinstance(l1.optimizer, torch.optim.Adam)
    assert not l1.pending and not l2.pending


def test_build_stage_weights_depend_on_seed_and_name_only():
    def build(name, seed):
        return make_stage(name, partial(Block, 8, 8), input_shapes=[(8,)],
                          optimizer={"name": "sgd", "lr": 0.1}, rule=SyntheticGradient(),
                          synthetic_gradient=SyntheticGradientConfig(hidden=1, width=8),
                          num_classes=3, seed=seed)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = build("l1", 0)
    assert torch.equal(torch.rand(3), expected_next), "the caller's RNG must be left alone"
    same, renamed, reseeded = build("l1", 0), build("l2", 0), build("l1", 1)
    weight = lambda stage: stage.module.net[1].weight  # noqa: E731
    assert torch.equal(weight(a), weight(same))
    assert not torch.equal(weight(a), weight(renamed))
    assert not torch.equal(weight(a), weight(reseeded))
    hidden = lambda stage: stage.synthesizer.net[0].weight  # noqa: E731
    assert torch.equal(hidden(a), hidden(same)) and not torch.equal(hidden(a), hidden(renamed))


def test_conv_chain_gets_a_conv_synthesizer():
    config = ChainConfig(
        nodes=[ChainNode("c1", partial(ConvBlock, 1, 4, pool=True)),
               ChainNode("head", partial(ConvClassifier, 4, 4, 4, 3))],
        input_shape=(1, 8, 8), num_classes=3, mode="cdni",
        synthetic_gradient=SyntheticGradientConfig(hidden=1, channels=4))
    trainer = ChainTrainer(config)
    assert trainer.stages[0].synthesizer.kind == "conv"
    loss = trainer.step(torch.randn(6, 1, 8, 8), torch.arange(6) % 3)
    assert loss > 0 and trainer.stages[0].stats.sg_fits == 1


def test_evaluate_counts_every_sample():
    trainer = ChainTrainer(chain("dni"))
    before = [p.clone() for s in trainer.stages for p in s.module.parameters()]
    result = trainer.evaluate(Blobs("test", seed=1, num_samples=100, batch_size=32))
    assert result.samples == 100 and 0 <= result.accuracy <= 1 and result.loss > 0
    after = [p for s in trainer.stages for p in s.module.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_target_backprop_fits_every_synthesizer_on_the_true_gradient():
    """With frozen modules (lr 0) the target that reaches l1 is plain autograd's dL/dh1."""
    trainer = ChainTrainer(replace(chain("dni"), optimizer={"name": "sgd", "lr": 0.0},
                                   synthetic_gradient=SyntheticGradientConfig(target="backprop")))
    x, y = next(iter(Blobs("train", 32, seed=1)))
    l1, l2, head = trainer.stages
    h1 = l1.module(x).detach().requires_grad_(True)  # modules in train mode, as in the step
    expected = torch.autograd.grad(F.cross_entropy(head.module(l2.module(h1)), y), h1)[0]
    received = []
    backward = l1.backward
    l1.backward = lambda seq, grad: received.append(grad) or backward(seq, grad)

    trainer.step(x, y)

    assert expected.abs().max() > 0
    assert torch.allclose(received[0], expected, rtol=0, atol=1e-6)
    assert l1.stats.sg_fits == l2.stats.sg_fits == 1

import pytest
import torch

from dni_mesh.synthetic import (SyntheticGradientConfig, SyntheticInput, Synthesizer, fit,
                                make_optimizer)

torch.set_num_threads(1)


@pytest.mark.parametrize("shape,config", [
    ((8,), SyntheticGradientConfig()),
    ((8,), SyntheticGradientConfig(hidden=2, width=16)),
    ((8,), SyntheticGradientConfig(hidden=1, width=16, conditioned=True)),
    ((3, 6, 6), SyntheticGradientConfig(channels=4)),
    ((3, 6, 6), SyntheticGradientConfig(hidden=2, channels=4, conditioned=True)),
    ((3, 6, 6), SyntheticGradientConfig(kind="mlp", hidden=1, width=16)),
])
def test_fresh_synthesizer_predicts_exact_zero(shape, config):
    torch.manual_seed(0)
    synthesizer = Synthesizer(shape, 10, config)
    h = torch.randn(5, *shape)
    labels = torch.randint(0, 10, (5,))
    g = synthesizer(h, labels if config.conditioned else None)
    assert g.shape == h.shape
    assert torch.equal(g, torch.zeros_like(h))


def test_auto_kind_follows_the_activation_shape():
    assert Synthesizer((3, 4, 4), None, SyntheticGradientConfig()).kind == "conv"
    assert Synthesizer((12,), None, SyntheticGradientConfig()).kind == "mlp"
    linear = Synthesizer((12,), None, SyntheticGradientConfig(kind="linear", hidden=3))
    assert len(linear.net) == 1


def test_bad_configurations_are_refused():
    with pytest.raises(ValueError, match="num_classes"):
        Synthesizer((4,), None, SyntheticGradientConfig(conditioned=True))
    with pytest.raises(ValueError, match="kind"):
        Synthesizer((4,), None, SyntheticGradientConfig(kind="rnn"))
    with pytest.raises(ValueError, match="C, H, W"):
        Synthesizer((4,), None, SyntheticGradientConfig(kind="conv"))
    with pytest.raises(ValueError, match="labels"):
        Synthesizer((4,), 3, SyntheticGradientConfig(conditioned=True))(torch.zeros(2, 4))


def test_linear_synthesizer_learns_the_exact_gradient_of_a_quadratic():
    """L(h) = 1/2 h'Ah + b'h has dL/dh = Ah + b: affine in h, so a linear M can be exact."""
    torch.manual_seed(0)
    d = 4
    q = torch.randn(d, d)
    a, b = q @ q.T / d + torch.eye(d), torch.randn(d)
    synthesizer = Synthesizer((d,), None, SyntheticGradientConfig())
    optimizer = make_optimizer(synthesizer.parameters(), {"name": "sgd", "lr": 1.5})
    h = torch.randn(256, d)
    for _ in range(150):
        fit(synthesizer, optimizer, h @ a + b, h)
    h = torch.randn(256, d)
    assert torch.allclose(synthesizer(h), h @ a + b, atol=1e-5)


def test_cdni_prediction_depends_on_the_labels_after_training():
    torch.manual_seed(0)
    per_class = torch.randn(3, 6)
    synthesizer = Synthesizer((6,), 3, SyntheticGradientConfig(conditioned=True))
    optimizer = make_optimizer(synthesizer.parameters(), {"name": "adam", "lr": 0.05})
    for _ in range(300):
        h, labels = torch.randn(32, 6), torch.randint(0, 3, (32,))
        fit(synthesizer, optimizer, per_class[labels], h, labels)
    h = torch.randn(1, 6).expand(3, 6)
    g = synthesizer(h, torch.arange(3))
    assert torch.allclose(g, per_class, atol=0.05)
    assert not torch.allclose(g[0], g[1], atol=0.1)


def test_cdni_with_two_labels_per_sample_reads_both():
    """Per sample one label per task (e.g. [B, 2]): each is one-hot, and the prediction can
    depend on the pair, here the gradient of task 1's class plus task 2's."""
    torch.manual_seed(0)
    first, second = torch.randn(3, 6), torch.randn(3, 6)
    synthesizer = Synthesizer((6,), 3, SyntheticGradientConfig(conditioned=True), labels_per_sample=2)
    assert synthesizer.net[0].in_features == 6 + 2 * 3
    optimizer = make_optimizer(synthesizer.parameters(), {"name": "adam", "lr": 0.05})
    for _ in range(400):
        h, labels = torch.randn(32, 6), torch.randint(0, 3, (32, 2))
        fit(synthesizer, optimizer, first[labels[:, 0]] + second[labels[:, 1]], h, labels)
    labels = torch.tensor([[0, 0], [0, 2], [2, 1]])
    g = synthesizer(torch.randn(1, 6).expand(3, 6), labels)
    assert torch.allclose(g, first[labels[:, 0]] + second[labels[:, 1]], atol=0.1)


def test_conv_cdni_broadcasts_labels_as_channels():
    torch.manual_seed(0)
    synthesizer = Synthesizer((2, 5, 5), 4, SyntheticGradientConfig(conditioned=True))
    assert synthesizer.net[0].in_channels == 2 + 4
    optimizer = make_optimizer(synthesizer.parameters(), {"name": "adam", "lr": 0.05})
    h, labels = torch.randn(8, 2, 5, 5), torch.arange(8) % 4
    target = labels.float()[:, None, None, None].expand(8, 2, 5, 5)
    losses = [fit(synthesizer, optimizer, target, h, labels) for _ in range(60)]
    assert losses[-1] < 0.1 * losses[0]


def test_synthetic_input_regresses_onto_the_real_activation():
    torch.manual_seed(0)
    model = SyntheticInput((1, 4, 4), (3,), hidden=1, width=32)
    optimizer = make_optimizer(model.parameters(), {"name": "adam", "lr": 0.01})
    w = torch.randn(16, 3)
    losses = []
    for _ in range(200):
        x = torch.randn(32, 1, 4, 4)
        losses.append(fit(model, optimizer, x.flatten(1) @ w, x))
    assert model(torch.randn(2, 1, 4, 4)).shape == (2, 3)
    assert losses[-1] < 0.05 * losses[0]


def test_make_optimizer_passes_keyword_arguments():
    p = [torch.nn.Parameter(torch.zeros(2))]
    adam = make_optimizer(p, {"name": "adam", "lr": 0.5, "betas": (0.8, 0.9)})
    assert isinstance(adam, torch.optim.Adam) and adam.defaults["betas"] == (0.8, 0.9)
    sgd = make_optimizer(p, {"name": "sgd", "lr": 0.1, "momentum": 0.9})
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9
    with pytest.raises(ValueError, match="rmsprop"):
        make_optimizer(p, {"name": "rmsprop", "lr": 0.1})

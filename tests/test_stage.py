import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dni_mesh.objective import Classification
from dni_mesh.stage import Stage
from dni_mesh.synthetic import SyntheticGradientConfig, Synthesizer, make_optimizer
from dni_mesh.update import Backprop, SyntheticGradient, Target, update_rule

torch.set_num_threads(1)
ADAM = {"name": "adam", "lr": 0.01}


def block(d_in: int, d_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, d_out), nn.BatchNorm1d(d_out), nn.ReLU())


def make_stage(mode="dni", module=None, d_out=6, head=False, window=64, bp_lambda=1.0,
               optimizer=ADAM, hidden=0, seed=0, gate=False) -> Stage:
    torch.manual_seed(seed)
    module = module if module is not None else block(4, d_out)
    synthesizer = sg_optimizer = None
    if not head and mode != "backprop":
        config = SyntheticGradientConfig(hidden=hidden, width=8, conditioned=mode == "cdni", gate=gate)
        synthesizer = Synthesizer((d_out,), 3, config)
        sg_optimizer = make_optimizer(synthesizer.parameters(), ADAM)
    rule = None if head else update_rule(mode, bp_lambda=bp_lambda)
    return Stage("s", module, make_optimizer(module.parameters(), optimizer), rule=rule,
                 objective=Classification(3) if head else None, synthesizer=synthesizer,
                 sg_optimizer=sg_optimizer, window=window)


def batch(seed=1, n=8, d=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, 3, (n,), generator=g)


def params(stage: Stage) -> list[torch.Tensor]:
    return [p.detach().clone() for p in stage.module.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def vjp(module: nn.Module, x: torch.Tensor, grad_of_output) -> torch.Tensor:
    """d/dx of module(x) applied to grad_of_output(h), by plain autograd."""
    x = x.clone().requires_grad_(True)
    h = module(x)
    return torch.autograd.grad(h, x, grad_of_output(h.detach()))[0]


@pytest.mark.parametrize("optimizer", [ADAM, {"name": "sgd", "lr": 0.1, "momentum": 0.9}])
@pytest.mark.parametrize("mode", ["dni", "cdni"])
def test_zero_initialised_synthesizer_gives_a_zero_first_update(mode, optimizer):
    stage = make_stage(mode, optimizer=optimizer, hidden=1)
    before = params(stage)
    x, y = batch()
    result = stage.forward(0, [x], y, [True])
    assert same(before, params(stage))
    assert torch.equal(result.input_grads[0], torch.zeros_like(x))
    assert stage.stats.steps == 1 and result.output.shape == (8, 6)


def train_chain(stages, steps):
    """A few DNI chain steps so that every synthesizer predicts something."""
    for seq in range(steps):
        x, y = batch(seed=100 + seq)
        sent = []
        for i, stage in enumerate(stages):
            r = stage.forward(seq, [x], y, [i > 0])
            sent.append(r.input_grads[0] if i > 0 else None)
            x = r.output
        for i in range(len(stages) - 1):
            stages[i].backward(seq, sent[i + 1])


@pytest.mark.parametrize("mode", ["dni", "cdni"])
def test_bootstrapped_chain_sends_upstream_the_gradient_its_synthesizer_implies(mode):
    a = make_stage(mode, seed=1)
    b = make_stage(mode, module=block(6, 6), seed=2)
    head = make_stage(module=nn.Linear(6, 3), head=True, seed=3)
    train_chain([a, b, head], steps=5)

    x, y = batch(seed=7)
    snap_a, snap_b, snap_head = (copy.deepcopy(s) for s in (a, b, head))
    out_a = a.forward(9, [x], y, [False]).output
    from_b = b.forward(9, [out_a], y, [True])
    from_head = head.forward(9, [from_b.output], y, [True])

    labels = y if mode == "cdni" else None
    expected_b = vjp(snap_b.module, out_a, lambda h: snap_b.synthesizer(h, labels))
    assert expected_b.abs().max() > 0
    assert torch.allclose(from_b.input_grads[0], expected_b, rtol=0, atol=1e-7)
    xh = from_b.output.clone().requires_grad_(True)
    loss = F.cross_entropy(snap_head.module(xh), y)
    expected_head = torch.autograd.grad(loss, xh)[0]
    assert torch.allclose(from_head.input_grads[0], expected_head, rtol=0, atol=1e-7)
    assert from_head.loss == pytest.approx(loss.item())

    # a fits its synthesizer onto exactly what b sent: the regression loss says so
    h_a = snap_a.module(x)
    target_loss = F.mse_loss(snap_a.synthesizer(h_a.detach(), labels), from_b.input_grads[0])
    fitted = a.backward(9, from_b.input_grads[0])
    assert fitted.input_grads is None
    assert fitted.sg_loss == pytest.approx(target_loss.item(), rel=1e-6)
    assert a.stats.sg_fits == 6


def test_backprop_waits_for_the_gradient_and_returns_the_true_input_gradient():
    stage = make_stage("backprop")
    x, y = batch()
    before, snapshot = params(stage), copy.deepcopy(stage.module)
    result = stage.forward(0, [x], y, [True])
    assert result.input_grads is None and same(before, params(stage))
    grad = torch.randn(8, 6)
    back = stage.backward(0, grad)
    assert not same(before, params(stage))
    assert torch.allclose(back.input_grads[0], vjp(snapshot, x, lambda h: grad), atol=1e-7)
    assert back.sg_loss is None and stage.stats.steps == 1


def test_bp_lambda_one_is_exactly_backprop():
    locked, mixed = make_stage("backprop"), make_stage("bp_lambda", bp_lambda=1.0)
    for seq in range(3):
        x, y = batch(seed=seq)
        grad = torch.randn(8, 6, generator=torch.Generator().manual_seed(50 + seq))
        locked.forward(seq, [x], y, [True])
        mixed.forward(seq, [x], y, [True])
        a, b = locked.backward(seq, grad), mixed.backward(seq, grad)
        assert torch.equal(a.input_grads[0], b.input_grads[0])
        assert b.sg_loss is not None
    assert same(params(locked), params(mixed))
    assert mixed.stats.sg_fits == 3


def test_bp_lambda_mixes_true_and_synthetic_gradient():
    lam = 0.3
    stage = make_stage("bp_lambda", bp_lambda=lam)
    for seq in range(3):  # train the synthesizer away from zero
        x, y = batch(seed=seq)
        stage.forward(seq, [x], y, [True])
        stage.backward(seq, torch.ones(8, 6))
    x, y = batch(seed=9)
    grad = torch.randn(8, 6)
    module, synthesizer = copy.deepcopy(stage.module), copy.deepcopy(stage.synthesizer)
    stage.forward(9, [x], y, [True])
    back = stage.backward(9, grad)

    def mixture(h):
        synthetic = synthesizer(h)
        assert synthetic.abs().max() > 0
        return lam * grad + (1 - lam) * synthetic
    assert torch.allclose(back.input_grads[0], vjp(module, x, mixture), atol=1e-7)


def test_stale_and_unknown_seq_are_counted_not_raised():
    for mode in ("dni", "backprop", "bp_lambda"):
        stage = make_stage(mode)
        assert stage.backward(5, torch.zeros(8, 6)).input_grads is None
        x, y = batch()
        stage.forward(0, [x], y, [True])
        stage.backward(0, torch.zeros(8, 6))
        stage.backward(0, torch.zeros(8, 6))
        stage.backward(3, torch.zeros(8, 6))
        assert (stage.stats.stale, stage.stats.unknown) == (1, 2), mode


def test_a_full_window_refuses_another_step_instead_of_evicting_one():
    stage = make_stage("dni", window=2)
    for seq in range(2):
        x, y = batch(seed=seq)
        stage.forward(seq, [x], y, [True])
    with pytest.raises(RuntimeError, match="window is full"):
        stage.forward(2, [x], y, [True])
    assert list(stage.pending) == [0, 1]
    assert stage.backward(0, torch.zeros(8, 6)).sg_loss is not None
    stage.forward(2, [x], y, [True])
    assert list(stage.pending) == [1, 2]


@pytest.mark.parametrize("mode", ["dni", "backprop", "bp_lambda"])
def test_evaluation_changes_nothing(mode):
    stage = make_stage(mode)
    train_chain([stage, make_stage(module=nn.Linear(6, 3), head=True)], steps=2)
    state = copy.deepcopy(stage.module.state_dict())
    sg_state = copy.deepcopy(stage.synthesizer.state_dict()) if stage.synthesizer else None
    x, y = batch(seed=11)
    result = stage.evaluate([x], y)
    assert all(torch.equal(v, stage.module.state_dict()[k]) for k, v in state.items())
    if sg_state:
        assert all(torch.equal(v, stage.synthesizer.state_dict()[k]) for k, v in sg_state.items())
    assert not stage.pending and result.input_grads is None
    assert torch.equal(result.output, stage.module.eval()(x))


def test_head_trains_on_the_loss_and_evaluates_without_update():
    head = make_stage(module=nn.Linear(4, 3), head=True)
    x, y = batch()
    snapshot = copy.deepcopy(head.module)
    evaluated = head.evaluate([x], y)
    loss = F.cross_entropy(snapshot(x), y)
    assert evaluated.loss == pytest.approx(loss.item())
    assert evaluated.correct == int((snapshot(x).argmax(1) == y).sum())
    assert same(list(snapshot.parameters()), params(head))
    trained = head.forward(1, [x], y, [True])
    assert trained.output is None and trained.loss == pytest.approx(loss.item())
    assert not same(list(snapshot.parameters()), params(head)) and head.stats.steps == 1


class Sum(nn.Module):
    def __init__(self):
        super().__init__()
        self.left, self.right = nn.Linear(4, 6), nn.Linear(2, 6)

    def forward(self, a, b):
        return self.left(a) + self.right(b)


def test_fan_in_calls_module_with_every_input_in_order():
    stage = make_stage("backprop", module=Sum())
    left = stage.module.left.weight.detach().clone()
    a, b = torch.randn(8, 4), torch.randn(8, 2)
    stage.forward(0, [a, b], None, [True, False])
    back = stage.backward(0, torch.ones(8, 6))
    assert back.input_grads[1] is None
    assert torch.allclose(back.input_grads[0], torch.ones(8, 6) @ left, atol=1e-6)


def test_rules_and_synthesizers_must_agree():
    module = block(4, 6)
    with pytest.raises(ValueError, match="conditioned"):
        synthesizer = Synthesizer((6,), 3, SyntheticGradientConfig())
        Stage("s", module, make_optimizer(module.parameters(), ADAM),
              rule=SyntheticGradient(conditioned=True), synthesizer=synthesizer,
              sg_optimizer=make_optimizer(synthesizer.parameters(), ADAM))
    with pytest.raises(ValueError, match="needs a synthesizer"):
        Stage("s", module, make_optimizer(module.parameters(), ADAM), rule=SyntheticGradient())
    with pytest.raises(ValueError, match="not both or neither"):
        Stage("s", module, make_optimizer(module.parameters(), ADAM))
    with pytest.raises(ValueError, match="mode 'sideways'"):
        make_stage("sideways")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_stage_runs_on_cuda_and_returns_tensors_there():
    stage = make_stage("dni")
    stage = Stage("s", stage.module, stage.optimizer, rule=stage.rule, synthesizer=stage.synthesizer,
                  sg_optimizer=stage.sg_optimizer, window=stage.window, device="cuda")
    x, y = batch()
    result = stage.forward(0, [x], y, [True])
    assert result.output.is_cuda and result.input_grads[0].is_cuda
    assert stage.backward(0, torch.zeros(8, 6)).sg_loss is not None


def test_target_backprop_sends_the_true_gradient_upstream_when_it_comes_back():
    torch.manual_seed(0)
    module = block(6, 6)
    synthesizer = Synthesizer((6,), 3, SyntheticGradientConfig())
    stage = Stage("b", module, make_optimizer(module.parameters(), ADAM),
                  rule=SyntheticGradient(target=Target.BACKPROP), synthesizer=synthesizer,
                  sg_optimizer=make_optimizer(synthesizer.parameters(), ADAM), window=4)
    x, y = batch(d=6)
    first = stage.forward(0, [x], y, [True])
    assert first.input_grads is None  # the upstream target is not known yet
    running = [b.clone() for b in module.buffers()]
    grad = torch.randn(8, 6, generator=torch.Generator().manual_seed(5))

    answer = stage.backward(0, grad)

    assert stage.stats.sg_fits == 1
    assert same(running, [b.clone() for b in module.buffers()])  # the recompute left BN alone
    expected = vjp(copy.deepcopy(module).train(), x, lambda h: grad)  # current weights
    assert expected.abs().max() > 0
    assert torch.allclose(answer.input_grads[0], expected, rtol=0, atol=1e-7)
    # an input that needs no gradient (the source's) is answered at once, with a credit
    assert stage.forward(1, [x], y, [False]).input_grads == [None]


def test_unknown_synthesizer_target_is_refused():
    with pytest.raises(ValueError, match="target 'true'"):
        update_rule("dni", target="true")


@pytest.mark.parametrize("mode", ["dni", "cdni", "backprop", "bp_lambda"])
def test_a_restored_stage_continues_bit_identically(tmp_path, mode):
    """Save a stage mid-run (between steps), load it into a fresh one built with other
    weights, and train both on the same batches: every loss and weight stays equal."""
    stage, head = make_stage(mode, hidden=1, bp_lambda=0.5), make_stage(module=nn.Linear(6, 3), head=True)
    train_chain([stage, head], steps=4)
    path = tmp_path / "stage.pt"
    torch.save(stage.state_dict(), path)
    restored = make_stage(mode, hidden=1, bp_lambda=0.5, seed=99)
    assert not same(params(stage), params(restored))
    restored.load_state_dict(torch.load(path, weights_only=True))
    assert restored.stats == stage.stats and restored.last_seq == stage.last_seq
    twin = copy.deepcopy(head)
    for seq in range(4, 8):
        x, y = batch(seed=200 + seq)
        outs = []
        for first, second in ((stage, head), (restored, twin)):
            out = first.forward(seq, [x], y, [False])
            back = second.forward(seq, [out.output], y, [True])
            first.backward(seq, back.input_grads[0])
            outs.append((out.output, back.loss))
        assert torch.equal(outs[0][0], outs[1][0]) and outs[0][1] == outs[1][1]
    assert same(params(stage), params(restored))
    if stage.synthesizer is not None:
        pairs = zip(stage.synthesizer.state_dict().values(), restored.synthesizer.state_dict().values())
        assert all(torch.equal(a, b) for a, b in pairs)


def test_delayed_at_window_1_is_exactly_backprop():
    """One step in flight: the stash is the current weights, so the delayed update is backprop's."""
    locked, delayed = make_stage("backprop"), make_stage("delayed")
    for seq in range(3):
        x, y = batch(seed=seq)
        grad = torch.randn(8, 6, generator=torch.Generator().manual_seed(50 + seq))
        assert delayed.forward(seq, [x], y, [True]).input_grads is None
        locked.forward(seq, [x], y, [True])
        a, b = locked.backward(seq, grad), delayed.backward(seq, grad)
        assert torch.allclose(a.input_grads[0], b.input_grads[0], atol=1e-7)
        assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(params(locked), params(delayed)))


def test_delayed_applies_each_gradient_at_the_weights_its_step_used():
    """Three steps in flight, answered late and out of step with the updates: each step's
    input gradient is the one of the weights it ran with (weight stashing), not the current."""
    stage = make_stage("delayed", module=nn.Linear(4, 6))
    used = []
    for seq in range(3):
        x, y = batch(seed=seq)
        used.append((x, copy.deepcopy(stage.module)))
        stage.forward(seq, [x], y, [True])
    for seq, (x, module) in enumerate(used):
        grad = torch.randn(8, 6, generator=torch.Generator().manual_seed(seq))
        back = stage.backward(seq, grad)
        assert torch.allclose(back.input_grads[0], vjp(module, x, lambda h: grad), atol=1e-6)
    assert stage.stats.steps == 3 and not stage.pending


def test_delayed_from_the_source_answers_at_once_with_a_credit():
    stage = make_stage("delayed")
    x, y = batch()
    assert stage.forward(0, [x], y, [False]).input_grads == [None]
    assert stage.backward(0, torch.randn(8, 6)).input_grads is None
    stage.forward(1, [x], y, [False])
    assert stage.forget(1) is None  # answered at forward time: nothing more is owed


def test_delayed_recomputes_in_training_mode_after_an_evaluation():
    """Batch norm normalises by the batch in training and by running statistics in evaluation:
    the late gradient must be the training-mode one the step's forward pass had."""
    stage = make_stage("delayed", module=nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6)))
    x, y = batch()
    before = copy.deepcopy(stage.module)
    stage.forward(0, [x], y, [True])
    stage.evaluate([batch(seed=9)[0]], None)
    grad = torch.randn(8, 6, generator=torch.Generator().manual_seed(3))
    back = stage.backward(0, grad)
    assert torch.allclose(back.input_grads[0], vjp(before, x, lambda h: grad), atol=1e-5)


def test_a_gated_stage_steps_as_far_as_its_synthesizer_explains_its_targets():
    """The gate multiplies a synthetic update's learning rate by the fraction of its targets M
    explains: none before M was fitted, and the optimizer's own rate is left as it was."""
    gated = make_stage(gate=True, optimizer={"name": "sgd", "lr": 0.1})
    assert gated.gated and gated.trust() == 0.0
    assert not make_stage("backprop").gated and not make_stage(head=True).gated
    x, y = batch()
    target = torch.randn(8, 6, generator=torch.Generator().manual_seed(3))
    for seq in range(20):  # M learns to predict a gradient
        gated.forward(seq, [x], y)
        gated.backward(seq, target)
    plain = copy.deepcopy(gated)
    plain.synthesizer.gate = False
    fraction = gated.trust()
    assert 0.0 < fraction < 1.0 and plain.trust() == 1.0
    before = params(gated)
    for stage in (gated, plain):
        stage.forward(20, [x], y)
    for b, g, p in zip(before, params(gated), params(plain)):
        assert torch.allclose(g - b, fraction * (p - b), atol=1e-7)
    assert not same(before, params(gated))
    assert [group["lr"] for group in gated.optimizer.param_groups] == [0.1]


def test_explained_is_the_fraction_of_the_target_power_predicted():
    from dni_mesh.synthetic import Explained
    explained = Explained(decay=0.5)
    assert explained.fraction == 0.0  # never fitted
    explained.add(0.25, torch.ones(4))  # error 0.25 of power 1
    assert explained.fraction == pytest.approx(0.75)
    explained.add(3.0, torch.ones(4))  # worse than predicting nothing: clipped at 0
    assert explained.fraction == 0.0

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dni_mesh.language_model import IGNORE, LanguageModel, bits_per_token, perplexity
from dni_mesh.recurrent import RecurrentStage, flat
from dni_mesh.synthetic import SyntheticGradientConfig, Synthesizer, fit, make_optimizer
from dni_mesh.update import Backprop, BPLambda, SyntheticGradient, Target
from nodes.lstm import LSTM, LSTMHead

torch.set_num_threads(1)
VOCAB, HIDDEN, B, T = 7, 5, 3, 4
ADAM = {"name": "adam", "lr": 0.01}


def chunks(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    stream = torch.randint(0, VOCAB, (B, n * T + 1), generator=g)
    return [(stream[:, i * T:(i + 1) * T], stream[:, i * T + 1:(i + 1) * T + 1]) for i in range(n)]


def time_synthesizer(size: int, random: bool, scale: float = 1.0) -> Synthesizer:
    synthesizer = Synthesizer((size,), None, SyntheticGradientConfig(hidden=0, scale=scale))
    if random:  # a trained synthesizer predicts something: make the bootstrap visible
        with torch.no_grad():
            for p in synthesizer.parameters():
                p.normal_(0, 0.1)
    return synthesizer


def head(dni: bool = False, random: bool = True, seed: int = 0) -> RecurrentStage:
    torch.manual_seed(seed)
    module = LSTMHead(VOCAB, HIDDEN, VOCAB, tokens=True)
    synthesizer = time_synthesizer(module.state_size, random) if dni else None
    return RecurrentStage("lm", module, make_optimizer(module.parameters(), ADAM),
                          objective=LanguageModel(), time_synthesizer=synthesizer,
                          time_sg_optimizer=make_optimizer(synthesizer.parameters(), ADAM)
                          if dni else None)


def params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_bptt_head_equals_plain_truncated_bptt_bit_for_bit():
    stage = head()
    torch.manual_seed(0)
    model = LSTMHead(VOCAB, HIDDEN, VOCAB, tokens=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    state = None
    for seq, (x, y) in enumerate(chunks(5)):
        logits, state = model(x, state)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        state = tuple(s.detach() for s in state)
        assert stage.forward(seq, [x], y).loss == loss.item()
    assert same(params(stage.module), params(model))
    assert all(torch.equal(a, b) for a, b in zip(stage.state, state))


def test_locked_layer_and_head_equal_a_two_layer_bptt_model():
    torch.manual_seed(0)
    first = LSTM(VOCAB, HIDDEN, tokens=True)
    top = LSTMHead(HIDDEN, HIDDEN, VOCAB)
    reference = copy.deepcopy((first, top))
    optimizers = [torch.optim.Adam(m.parameters(), lr=0.01) for m in reference]
    lower = RecurrentStage("l1", first, make_optimizer(first.parameters(), ADAM), rule=Backprop())
    upper = RecurrentStage("l2", top, make_optimizer(top.parameters(), ADAM),
                           objective=LanguageModel())
    states = [None, None]
    for seq, (x, y) in enumerate(chunks(4)):
        h = lower.forward(seq, [x], None).output
        result = upper.forward(seq, [h], y)
        lower.backward(seq, result.input_grads[0])
        mid, states[0] = reference[0](x, states[0])
        logits, states[1] = reference[1](mid, states[1])
        loss = LanguageModel().loss(logits, y)
        for o in optimizers:
            o.zero_grad()
        loss.backward()
        for o in optimizers:
            o.step()
        states = [tuple(s.detach() for s in state) for state in states]
        assert result.loss == pytest.approx(loss.item(), abs=1e-6)
    for stage, module in zip((lower, upper), reference):
        for a, b in zip(params(stage.module), params(module)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def by_hand(stage: RecurrentStage, x: torch.Tensor, y: torch.Tensor, future_scale: float = 1.0,
            normalise=lambda target: target):
    """Copies of the stage's module and M_t, stepped on chunk (x, y) as DNI in time says: the
    module's loss plus M_t's prediction (times future_scale) at the chunk's end, then M_t fitted
    on normalise(the gradient that reached the start). Returns them, the target and the future."""
    start = tuple(s.clone() for s in stage.state)
    module = copy.deepcopy(stage.module)
    synthesizer = copy.deepcopy(stage.time_synthesizer)
    sg_optimizer = make_optimizer(synthesizer.parameters(), ADAM)
    sg_optimizer.load_state_dict(copy.deepcopy(stage.time_sg_optimizer.state_dict()))
    optimizer = make_optimizer(module.parameters(), ADAM)
    optimizer.load_state_dict(copy.deepcopy(stage.optimizer.state_dict()))
    leaves = tuple(s.clone().requires_grad_(True) for s in start)
    logits, end = module(x, leaves)
    future = future_scale * synthesizer(flat(end).detach()).detach()
    total = LanguageModel().loss(logits, y) + (flat(end) * future).sum()
    optimizer.zero_grad()
    total.backward()
    optimizer.step()
    target = flat(tuple(s.grad for s in leaves))
    fit(synthesizer, sg_optimizer, normalise(target), flat(start))
    return module, synthesizer, target, future


def assert_same_weights(stage: RecurrentStage, module: nn.Module, synthesizer: nn.Module) -> None:
    for a, b in [*zip(params(stage.module), params(module)),
                 *zip(params(stage.time_synthesizer), params(synthesizer))]:
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_dni_in_time_updates_with_the_prediction_and_fits_the_bootstrapped_target():
    stage = head(dni=True)
    (x0, y0), (x1, y1) = chunks(2)
    stage.forward(0, [x0], y0)
    module, synthesizer, target, future = by_hand(stage, x1, y1)
    assert target.abs().sum() > 0 and future.abs().sum() > 0
    stage.forward(1, [x1], y1)
    assert_same_weights(stage, module, synthesizer)
    assert stage.stats.time_fits == 1  # the first chunk starts from the zero state: no fit


def test_normalised_time_targets_scale_the_fit_and_the_prediction_by_their_running_size():
    beta = 0.75
    stage = head(dni=True)
    stage.time_target_decay = beta
    (x0, y0), (x1, y1) = chunks(2)
    stage.forward(0, [x0], y0)   # no fit yet: sigma is 0, M_t silent
    assert stage.time_target_ms is None and stage.target_scale() == 0.0
    stage.time_target_ms = 4.0   # as if earlier targets had had a mean square of 4: sigma 2

    def normalise(target: torch.Tensor) -> torch.Tensor:
        return target / (beta * 4.0 + (1 - beta) * target.pow(2).mean().item()) ** 0.5

    module, synthesizer, target, _ = by_hand(stage, x1, y1, 2.0, normalise)
    stage.forward(1, [x1], y1)
    ms = beta * 4.0 + (1 - beta) * target.pow(2).mean().item()
    assert stage.time_target_ms == pytest.approx(ms)
    assert_same_weights(stage, module, synthesizer)
    restored = head(dni=True)
    restored.time_target_decay = beta
    restored.load_state_dict(io_roundtrip(stage.state_dict()))
    assert restored.time_target_ms == pytest.approx(ms)
    with pytest.raises(ValueError, match="time_target_decay"):
        RecurrentStage("lm", LSTMHead(VOCAB, HIDDEN, VOCAB, tokens=True),
                       torch.optim.SGD([torch.zeros(1)], lr=0.1), objective=LanguageModel(),
                       time_target_decay=1.0)


def io_roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_a_zero_initialised_time_synthesizer_is_truncated_bptt_at_first():
    dni, bptt = head(dni=True, random=False), head()
    x, y = chunks(1)[0]
    assert dni.forward(0, [x], y).loss == bptt.forward(0, [x], y).loss
    assert same(params(dni.module), params(bptt.module))


def test_state_is_carried_detached_and_continues_the_sequence():
    torch.manual_seed(0)
    module = LSTM(VOCAB, HIDDEN, tokens=True)
    stage = RecurrentStage("l1", module, torch.optim.SGD(module.parameters(), lr=0.0),
                           rule=Backprop())
    data = chunks(3)
    outputs = []
    for seq, (x, _) in enumerate(data):
        outputs.append(stage.forward(seq, [x], None).output)
        assert all(s.grad_fn is None and not s.requires_grad for s in stage.state)
        stage.backward(seq, torch.zeros_like(outputs[-1]))
    whole, _ = module(torch.cat([x for x, _ in data], dim=1))
    torch.testing.assert_close(torch.cat(outputs, dim=1), whole.detach())


def test_evaluation_state_is_separate_and_resets():
    stage = head(dni=True)
    (x0, y0), (x1, y1) = chunks(2)
    stage.forward(0, [x0], y0)
    training = tuple(s.clone() for s in stage.state)
    first = stage.evaluate([x1], y1).loss
    assert stage.evaluate([x1], y1).loss != first   # carried: the same chunk, another state
    assert all(torch.equal(a, b) for a, b in zip(stage.state, training))
    stage.reset_eval_state()
    assert stage.evaluate([x1], y1).loss == first


def test_state_dict_round_trip_continues_bit_identically():
    stage = head(dni=True)
    data = chunks(6)
    for seq, (x, y) in enumerate(data[:3]):
        stage.forward(seq, [x], y)
    buffer = io.BytesIO()
    torch.save(stage.state_dict(), buffer)
    buffer.seek(0)
    restored = head(dni=True, seed=1)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.stats == stage.stats
    for seq, (x, y) in enumerate(data[3:], start=3):
        assert restored.forward(seq, [x], y).loss == stage.forward(seq, [x], y).loss
    assert same(params(restored.module), params(stage.module))
    assert same(params(restored.time_synthesizer), params(stage.time_synthesizer))


def test_synthetic_gradient_between_nodes_updates_at_once_and_fits_per_time_step():
    torch.manual_seed(0)
    module = LSTM(VOCAB, HIDDEN, tokens=True)
    synthesizer = Synthesizer((HIDDEN,), None, SyntheticGradientConfig(hidden=0))
    in_time = time_synthesizer(module.state_size, True)
    stage = RecurrentStage("l1", module, make_optimizer(module.parameters(), ADAM),
                           rule=SyntheticGradient(), synthesizer=synthesizer,
                           sg_optimizer=make_optimizer(synthesizer.parameters(), ADAM),
                           time_synthesizer=in_time,
                           time_sg_optimizer=make_optimizer(in_time.parameters(), ADAM),
                           window=2)
    (x0, _), (x1, _) = chunks(2)
    out0 = stage.forward(0, [x0], None).output
    stage.forward(1, [x1], None)
    assert stage.stats.steps == 2 and sorted(stage.pending) == [0, 1]
    before = params(synthesizer)
    result = stage.backward(0, torch.ones_like(out0))
    assert result.sg_loss == pytest.approx(1.0) and not same(before, params(synthesizer))
    stage.backward(0, torch.ones_like(out0))
    stage.backward(7, torch.ones_like(out0))
    assert (stage.stats.sg_fits, stage.stats.stale, stage.stats.unknown) == (1, 1, 1)


def unlocked_layer(gate: bool) -> RecurrentStage:
    """An unlocked LSTM layer (dni between nodes, DNI in time), its synthesizers gated or not."""
    torch.manual_seed(0)
    module = LSTM(VOCAB, HIDDEN, tokens=True)
    synthesizer = Synthesizer((HIDDEN,), None, SyntheticGradientConfig(hidden=0, gate=gate))
    in_time = time_synthesizer(module.state_size, True)
    return RecurrentStage("l1", module, make_optimizer(module.parameters(), ADAM),
                          rule=SyntheticGradient(), synthesizer=synthesizer,
                          sg_optimizer=make_optimizer(synthesizer.parameters(), ADAM),
                          time_synthesizer=in_time,
                          time_sg_optimizer=make_optimizer(in_time.parameters(), ADAM), window=2)


def test_a_gated_layer_steps_at_the_learning_rate_times_its_synthesizers_explained_fraction():
    gated, plain = unlocked_layer(gate=True), unlocked_layer(gate=False)
    (x0, _), (x1, _), (x2, _) = chunks(3)
    before = params(gated.module)
    plain.optimizer.param_groups[0]["lr"] = 0.0  # a fresh synthesizer explains nothing
    for stage in (gated, plain):
        out0 = stage.forward(0, [x0], None).output
        stage.forward(1, [x1], None)
    assert gated.trust() == 0.0 and gated.stats.steps == 2 and same(before, params(gated.module))
    target = torch.randn(out0.shape, generator=torch.Generator().manual_seed(1))
    for stage in (gated, plain):
        stage.backward(0, target)
    assert 0.0 < gated.trust() < 1.0 and plain.trust() == 1.0
    plain.optimizer.param_groups[0]["lr"] = ADAM["lr"] * gated.trust()
    gated.forward(2, [x2], None)
    plain.forward(2, [x2], None)
    assert gated.optimizer.param_groups[0]["lr"] == ADAM["lr"]  # for that step only
    for a, b in zip(params(gated.module), params(plain.module), strict=True):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("rule", [BPLambda(0.5), SyntheticGradient(target=Target.BACKPROP)])
def test_rules_a_recurrent_stage_cannot_follow_are_refused(rule):
    module = LSTM(VOCAB, HIDDEN)
    synthesizer = Synthesizer((HIDDEN,), None, SyntheticGradientConfig())
    with pytest.raises(ValueError, match="not supported"):
        RecurrentStage("l1", module, make_optimizer(module.parameters(), ADAM), rule=rule,
                       synthesizer=synthesizer,
                       sg_optimizer=make_optimizer(synthesizer.parameters(), ADAM))


def test_language_model_scores_only_scored_tokens():
    objective = LanguageModel()
    logits = torch.zeros(2, 3, 4)
    logits[0, 0, 2] = 5.0
    labels = torch.tensor([[2, IGNORE, 1], [IGNORE, IGNORE, IGNORE]])
    uniform = math.log(4)
    expected = (F.cross_entropy(logits[0, 0], torch.tensor(2)).item() + uniform) / 2
    assert objective.loss(logits, labels).item() == pytest.approx(expected)
    assert objective.correct(logits, labels) == 1 and objective.scored(labels) == 2
    assert objective.loss(logits, torch.full((2, 3), IGNORE)).item() == 0.0
    assert bits_per_token(uniform) == pytest.approx(2.0)
    assert perplexity(uniform) == pytest.approx(4.0)

"""Update rules: how a node turns the gradient of its output into a weight update.

A topology names a node's rule by its out-edges' mode ("backprop", "dni", "cdni", "bp_lambda");
from there on the code carries one of the types below, so every decision that depends on the
rule is a property of the rule rather than a comparison of strings.

- `Backprop`: locked. The node keeps its graph until the true gradient comes back, then
  updates and passes the true input gradient upstream.
- `SyntheticGradient`: the paper's DNI (cDNI when `conditioned`). The node updates at once from
  M(h) and fits M when the true gradient comes back. `target` says what goes upstream as the
  target of the upstream synthesizer (see `Target`).
- `BPLambda`: the paper's BP(lambda) (Jaderberg et al. 2016, supplement A): locked like
  backprop, but the applied gradient is lam * true + (1 - lam) * M(h).
- `Delayed`: no wait, and no synthesizer: the node goes on with its next steps and applies
  each step's true gradient when it comes back, computed with the weights that step used
  (weight stashing, as PipeDream does); its input gradients go upstream then.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Union

MODES = ("backprop", "dni", "cdni", "bp_lambda", "delayed")


class Target(enum.Enum):
    """What a synthetic-gradient node sends upstream for the upstream synthesizer to fit.

    BOOTSTRAP (the paper's): the input gradient its own prediction M(h) implies, sent at once.
    BACKPROP: the true gradient when it comes back, backpropagated through the module with the
    current weights; every synthesizer then regresses onto the true gradient, one round trip
    late, while updates stay synthetic and unlocked.
    """
    BOOTSTRAP = "bootstrap"
    BACKPROP = "backprop"


@dataclass(frozen=True)
class Backprop:
    locked = True
    synthetic = False


@dataclass(frozen=True)
class SyntheticGradient:
    conditioned: bool = False
    target: Target = Target.BOOTSTRAP
    locked = False
    synthetic = True

    @property
    def defers_input_grads(self) -> bool:
        """Input gradients go upstream when the true gradient comes back, not at once."""
        return self.target is Target.BACKPROP


@dataclass(frozen=True)
class BPLambda:
    lam: float = 1.0
    locked = True
    synthetic = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"BP(lambda): lambda must be in [0, 1], got {self.lam}")


@dataclass(frozen=True)
class Delayed:
    locked = False
    synthetic = False
    defers_input_grads = True


UpdateRule = Union[Backprop, SyntheticGradient, BPLambda, Delayed]


def update_rule(mode: str, *, target: str = "bootstrap", bp_lambda: float = 1.0) -> UpdateRule:
    """The rule a topology's mode names; `target` matters for dni and cdni, `bp_lambda` for
    bp_lambda (whose synthesizer is conditioned or not by its own setting)."""
    if mode == "backprop":
        return Backprop()
    if mode in ("dni", "cdni"):
        try:
            parsed = Target(target)
        except ValueError:
            raise ValueError(f"synthesizer target {target!r}: expected one of "
                             f"{[t.value for t in Target]}") from None
        return SyntheticGradient(conditioned=mode == "cdni", target=parsed)
    if mode == "bp_lambda":
        return BPLambda(bp_lambda)
    if mode == "delayed":
        return Delayed()
    raise ValueError(f"mode {mode!r}: expected one of {MODES}")

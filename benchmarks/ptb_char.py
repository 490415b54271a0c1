"""Penn Treebank characters: truncated BPTT(T) against DNI in time, DNI(T), in one process.

    python -m benchmarks.ptb_char [--truncations 2,4,8] [--methods bptt,dni] [--tokens N]
        [--quick] [--json PATH] [--data-dir DIR]

Jaderberg et al. 2016, section 3.2: an LSTM language model trained on chunks of T characters,
its state carried across chunks. BPTT(T) sees no gradient from beyond the chunk; DNI(T) adds
a time synthesizer's prediction of it at every boundary (`dni_mesh.recurrent`). Every run has
the same model, data order, seed and number of training characters (the budget); the curve is
the bits per character on the start of the validation split as training goes, the result the
bits per character on the whole test split, evaluated with the state carried across it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from dni_mesh.language_model import LanguageModel, bits_per_token
from dni_mesh.recurrent import RecurrentStage
from dni_mesh.synthetic import SyntheticGradientConfig, Synthesizer, make_optimizer
from nodes.lstm import LSTMHead
from nodes.ptb import PennTreebank

EVAL_CHUNK = 100  # evaluation carries its state, so its chunk length only sets the speed


@dataclass
class Run:
    """One (method, T) training run and its measurements."""
    method: str
    truncation: int
    test_bpc: float = 0.0
    curve: list[dict] = field(default_factory=list)   # {"tokens", "train_s", "valid_bpc"}
    tokens_per_s: float = 0.0                         # training only
    time_sg_loss: float | None = None                 # DNI: last regression loss of M_t


def stage_for(method: str, vocab: int, args: argparse.Namespace,
              time_target_decay: float | None = None) -> RecurrentStage:
    """An LSTM language model over `vocab` tokens; under "dni" with a time synthesizer (its
    targets normalised by their running size with a time_target_decay: `RecurrentStage`)."""
    torch.manual_seed(args.seed)
    module = LSTMHead(vocab, args.hidden, vocab, tokens=True)
    synthesizer = sg_optimizer = None
    if method == "dni":
        config = SyntheticGradientConfig(hidden=args.sg_hidden, width=args.sg_width,
                                         scale=args.sg_scale)
        synthesizer = Synthesizer((module.state_size,), None, config)
        sg_optimizer = make_optimizer(synthesizer.parameters(),
                                      {"name": args.sg_optimizer, "lr": args.sg_lr})
    return RecurrentStage("lm", module, make_optimizer(module.parameters(),
                                                       {"name": "adam", "lr": args.lr}),
                          objective=LanguageModel(), time_synthesizer=synthesizer,
                          time_sg_optimizer=sg_optimizer, time_target_decay=time_target_decay)


def bpc(stage: RecurrentStage, data: PennTreebank) -> float:
    """Bits per character over a whole split, the state carried from its first character."""
    stage.reset_eval_state()
    total = count = 0
    for x, y in data:
        total += stage.evaluate([x], y).loss * y.numel()
        count += y.numel()
    return bits_per_token(total / count)


def train(method: str, truncation: int, args: argparse.Namespace, valid: PennTreebank,
          test: PennTreebank) -> Run:
    data = PennTreebank("train", batch_size=args.batch_size, chunk=truncation,
                        data_dir=args.data_dir, limit=args.tokens + 1)
    stage = stage_for(method, data.num_classes, args)
    run = Run(method, truncation)
    tokens = train_s = 0.0
    next_eval = args.eval_every
    for seq, (x, y) in enumerate(data):
        tick = time.perf_counter()
        stage.forward(seq, [x], y)
        train_s += time.perf_counter() - tick
        tokens += y.numel()
        if tokens >= next_eval or seq == len(data) - 1:
            next_eval += args.eval_every
            run.curve.append({"tokens": int(tokens), "train_s": round(train_s, 1),
                              "valid_bpc": bpc(stage, valid)})
            print(f"  {method:4} T={truncation}: {int(tokens):8} chars {train_s:6.0f} s "
                  f"valid {run.curve[-1]['valid_bpc']:.3f} bpc", flush=True)
    run.tokens_per_s = tokens / train_s
    run.test_bpc = bpc(stage, test)
    if stage.time_synthesizer is not None:
        run.time_sg_loss = stage.stats.time_loss
    return run


def table(runs: list[Run]) -> str:
    lines = ["| method | T | test BPC | valid BPC (curve end) | chars/s |", "|---|---|---|---|---|"]
    lines += [f"| {r.method} | {r.truncation} | {r.test_bpc:.3f} | "
              f"{r.curve[-1]['valid_bpc']:.3f} | {r.tokens_per_s:.0f} |" for r in runs]
    return "\n".join(lines)


def add_model_arguments(p: argparse.ArgumentParser, hidden: int, batch_size: int) -> None:
    """The model and training flags both recurrent benchmarks share (see `stage_for`)."""
    p.add_argument("--hidden", type=int, default=hidden, help="LSTM units")
    p.add_argument("--batch-size", type=int, default=batch_size, help="parallel rows")
    p.add_argument("--lr", type=float, default=3e-3, help="LSTM's Adam learning rate")
    p.add_argument("--sg-optimizer", choices=("adam", "sgd"), default="adam",
                   help="time synthesizer's optimizer")
    p.add_argument("--sg-lr", type=float, default=1e-5, help="time synthesizer's learning rate")
    p.add_argument("--sg-scale", type=float, default=0.05, help="factor on M_t's prediction")
    p.add_argument("--sg-hidden", type=int, default=0, help="hidden layers of M_t")
    p.add_argument("--sg-width", type=int, default=256, help="units per hidden layer of M_t")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--truncations", default="2,4,8", help="chunk lengths T, comma separated")
    p.add_argument("--methods", default="bptt,dni")
    p.add_argument("--tokens", type=int, default=600_000, help="training characters per run")
    p.add_argument("--eval-every", type=int, default=100_000,
                   help="training characters between curve points")
    p.add_argument("--valid-chars", type=int, default=50_000,
                   help="validation characters scored per curve point")
    p.add_argument("--test-chars", type=int, help="test characters (default: the whole split)")
    add_model_arguments(p, hidden=128, batch_size=32)
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny budget and splits")
    p.add_argument("--data-dir", help="folder holding ptb/ (default: env DNI_MESH_DATA)")
    p.add_argument("--json", default="benchmarks/results/ptb_char.json")
    args = p.parse_args()
    if args.quick:
        args.tokens, args.eval_every = 20_000, 10_000
        args.valid_chars, args.test_chars = 5_000, 20_000
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    valid = PennTreebank("valid", batch_size=args.batch_size, chunk=EVAL_CHUNK,
                         data_dir=args.data_dir, limit=args.valid_chars)
    test = PennTreebank("test", batch_size=args.batch_size, chunk=EVAL_CHUNK,
                        data_dir=args.data_dir, limit=args.test_chars)
    start = time.perf_counter()
    runs = [train(method, int(t), args, valid, test)
            for t in args.truncations.split(",") for method in args.methods.split(",")]
    print(table(runs))
    write_report(args, "benchmarks.ptb_char", [asdict(r) for r in runs], start)


def write_report(args: argparse.Namespace, command: str, runs: list[dict], start: float) -> None:
    """The runs, the command that made them, its settings and the machine, as JSON."""
    machine = {"platform": platform.platform(), "processor": platform.processor(),
               "cpus": os.cpu_count(), "torch": torch.__version__, "threads": args.threads}
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"command": ["python", "-m", command, *sys.argv[1:]], "machine": machine,
                   "settings": vars(args), "wall_s": round(time.perf_counter() - start),
                   "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()

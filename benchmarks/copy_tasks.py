"""Copy and repeat copy: the longest sequence BPTT(T) and DNI(T) learn, on a curriculum.

    python -m benchmarks.copy_tasks [--tasks copy,repeat_copy] [--truncations 2,4,8]
        [--methods bptt,dni] [--tokens N] [--quick] [--json PATH]

Jaderberg et al. 2016, section 3.2 and table 2: an LSTM reads a stream of episodes
(`nodes.sequence_tasks.CopyTask`) in chunks of T steps, its state carried across chunks. A
level counts as solved when the recall costs under 0.15 bits per symbol (the paper's
threshold) over the second half of a stretch of `--check` chunks; then the curriculum moves
on: copy lengthens the sequence N by one, repeat copy raises N and the repeat count R in turn.
Every run gets the same model, seed and number of training steps (the budget); the result is
the hardest level solved. A recall spans N steps (copy) or N * R (repeat copy): past T, BPTT
gets no gradient across it and only a synthesizer in time can carry one.
"""
from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch

from benchmarks.ptb_char import add_model_arguments, stage_for, write_report
from dni_mesh.language_model import LanguageModel, bits_per_token
from dni_mesh.recurrent import RecurrentStage
from nodes.sequence_tasks import CopyTask

SOLVED_BITS = 0.15


@dataclass
class Run:
    """One (task, method, T) curriculum and how far it got."""
    task: str
    method: str
    truncation: int
    length: int = 0          # N of the hardest level solved (0: none)
    repeats: int = 0         # R of that level
    solved: list[dict] = field(default_factory=list)  # {"length", "repeats", "tokens", "train_s"}
    tokens_per_s: float = 0.0


def levels(task: str):
    """(N, R) of the curriculum: copy lengthens N; repeat copy raises N and R in turn."""
    n, r = 1, 1
    while True:
        yield n, r
        if task == "copy" or n == r:
            n += 1
        else:
            r += 1


def stretch(stage: RecurrentStage, source: CopyTask, epoch: int, steps: Iterator[int]
            ) -> tuple[float, int, float]:
    """Train on one stretch of source: (bits per recalled symbol over its second half,
    time steps x rows trained, seconds spent training)."""
    objective = LanguageModel()
    bits = scored = tokens = 0
    seconds = 0.0
    for i, (x, y) in enumerate(source.iterate(epoch)):
        tick = time.perf_counter()
        loss = stage.forward(next(steps), [x], y).loss
        seconds += time.perf_counter() - tick
        tokens += y.numel()
        if i >= len(source) // 2:
            bits += bits_per_token(loss) * objective.scored(y)
            scored += objective.scored(y)
    return bits / max(scored, 1), tokens, seconds


def curriculum(task: str, method: str, truncation: int, args: argparse.Namespace) -> Run:
    run = Run(task, method, truncation)
    steps = itertools.count()
    stage = None
    tokens = 0
    train_s = 0.0
    for n, r in levels(task):
        source = CopyTask(n, r, batch_size=args.batch_size, chunk=truncation,
                          batches=args.check, seed=args.seed)
        stage = stage or stage_for(method, source.num_classes, args, args.sg_target_decay or None)
        bits = float("inf")
        epoch = 0
        while bits >= SOLVED_BITS and tokens < args.tokens:
            bits, spent, seconds = stretch(stage, source, epoch, steps)
            tokens += spent
            train_s += seconds
            epoch += 1
        if bits >= SOLVED_BITS:
            break
        run.length, run.repeats = n, r
        run.solved.append({"length": n, "repeats": r, "tokens": tokens,
                           "train_s": round(train_s, 1)})
        print(f"  {task:11} {method:4} T={truncation}: solved N={n} R={r} after "
              f"{tokens} steps x rows", flush=True)
    run.tokens_per_s = tokens / train_s
    return run


def table(runs: list[Run]) -> str:
    lines = ["| task | method | T | longest N solved | R | recall span N*R | steps x rows |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r.task} | {r.method} | {r.truncation} | {r.length} | {r.repeats} | "
              f"{r.length * r.repeats} | {r.solved[-1]['tokens'] if r.solved else '-'} |"
              for r in runs]
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default="copy,repeat_copy")
    p.add_argument("--truncations", default="2,4,8", help="chunk lengths T, comma separated")
    p.add_argument("--methods", default="bptt,dni")
    p.add_argument("--tokens", type=int, default=600_000,
                   help="training budget per run: time steps x batch rows")
    p.add_argument("--check", type=int, default=100, help="chunks per stretch between checks")
    add_model_arguments(p, hidden=64, batch_size=16)
    p.add_argument("--sg-target-decay", type=float, default=0.99,
                   help="decay of the running size M_t's targets are divided by (0: raw targets)")
    p.add_argument("--quick", action="store_true", help="a smoke run: a tiny budget")
    p.add_argument("--json", default="benchmarks/results/copy_tasks.json")
    # M_t fits targets normalised by their running size, so its rate is relative: see results
    p.set_defaults(sg_lr=1e-4, sg_scale=0.1)
    args = p.parse_args()
    if args.quick:
        args.tokens, args.check = 8_000, 20
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    runs = [curriculum(task, method, int(t), args) for task in args.tasks.split(",")
            for t in args.truncations.split(",") for method in args.methods.split(",")]
    print(table(runs))
    write_report(args, "benchmarks.copy_tasks", [asdict(r) for r in runs], start)


if __name__ == "__main__":
    main()

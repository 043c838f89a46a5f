r"""``lazy-monitor demo``: see the lazy regime appear as the width grows, in one command.

What it runs (Lightning, CPU, well under a minute with the defaults; the measured time is in
``benchmarks/RESULTS.md``):

* the task: two interleaved spirals in the plane (:func:`lazy_monitor.demo.datasets.two_spirals`,
  generated in code), a binary classification that needs a nonlinear boundary, trained with
  the logistic loss on one logit;
* the lazy sweep: one-hidden-layer ReLU MLPs in the NTK parameterisation
  (:func:`lazy_monitor.demo.models.mlp`) of each ``--widths``, ``--inits`` initialisations each, all
  with the same learning rate and number of full-batch gradient-descent steps;
* one non-lazy run: the narrowest width with the output scaled by α = 0.1 and the learning rate
  by 1/α² (Chizat, Oyallon & Bach 2019, "On Lazy Training in Differentiable Programming": the
  same function-space dynamics at the start, but the weights must move 1/α times further, so
  the kernel moves by O(1));
* :class:`~lazy_monitor.callbacks.pytorch_lightning.KernelRegimeMonitor` on a fixed probe of
  training points, logging to TensorBoard under ``--out`` (one folder per run).

It then reads the event files back (as ``lazy-monitor report`` does) and prints per width (mean
over the initialisations) the final
``ntk/rel_change`` ‖K_t − K₀‖_F/‖K₀‖_F, ``params/rel_change`` ‖θ_t − θ₀‖/‖θ₀‖,
``lin/rel_error`` ‖f − f_lin‖/‖f − f₀‖ and the verdict (``regime/lazy``), and the least-squares
slope of log ``ntk/rel_change`` against log width, fitted to every run of the sweep.

What to expect from the slope: Lee et al. 2019 bound the relative change of the NTK by
O(width^-1/2) in the NTK parameterisation with a fixed learning rate; first-order contributions of
smooth units cancel to O(1/width) (Dyer & Gur-Ari 2020), while ReLU units whose activation
pattern flips keep a slower decay, so the fitted slope of this ReLU net lands between −1/2 and −1
(about −0.7 with the defaults). A slope near 0 would mean the kernel moves by O(1) at every width
(e.g. a learning rate above the catapult threshold, Lewkowycz et al. 2020).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TextIO

from lazy_monitor.cli import catapult as _catapult
from lazy_monitor.cli import phase as _phase
from lazy_monitor.cli._events import load_run
from lazy_monitor.cli.report import format_table, verdict

__all__ = ["DemoRun", "add_parser", "loglog_slope", "parse_widths", "run"]

DEFAULT_WIDTHS = (64, 256, 1024, 4096)
DEFAULT_STEPS = 200
DEFAULT_LR = 1.0
DEFAULT_INITS = 3
#: Chizat–Bach output scale of the non-lazy run (learning rate scaled by 1/α²).
NONLAZY_ALPHA = 0.1
_N_TRAIN = 512
_PROBE_SIZE = 128
_MEASUREMENTS = 20  # evenly spaced, plus the log-spaced early steps


@dataclass
class DemoRun:
    """One training run of the demo and what its event files say."""

    name: str
    width: int
    alpha: float
    lr: float
    lazy_sweep: bool
    log_dir: Path
    init: int = 0
    ntk: float = math.nan
    params: float = math.nan
    lin: float = math.nan
    verdict: str = "unknown"
    seconds: float = 0.0


def parse_widths(text: str) -> list[int]:
    """``"64,256,1024"`` -> ``[64, 256, 1024]`` (argparse type; at least two distinct widths)."""
    try:
        widths = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers, e.g. 64,256,1024,4096"
        ) from None
    if any(w < 2 for w in widths):
        raise argparse.ArgumentTypeError(f"widths must be >= 2, got {text!r}")
    if len(set(widths)) < 2:
        raise argparse.ArgumentTypeError(
            f"give at least two different widths to fit a slope, got {text!r}"
        )
    return sorted(set(widths))


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


def loglog_slope(widths: list[float], values: list[float]) -> float:
    """Least-squares slope of ``log(values)`` against ``log(widths)``; NaN if any value is not
    positive and finite or fewer than two points remain."""
    if len(widths) < 2 or any(not (math.isfinite(v) and v > 0) for v in values):
        return math.nan
    xs = [math.log(w) for w in widths]
    ys = [math.log(v) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo",
        help="train MLPs of several widths (and one non-lazy run) and show the lazy regime",
        description=(
            "Train one-hidden-layer NTK-parameterised MLPs of several widths on two spirals with "
            "KernelRegimeMonitor, plus one non-lazy run (Chizat-Bach output scale alpha=0.1), "
            "log to TensorBoard, and print the drift table and the width exponent of "
            "ntk/rel_change."
        ),
        epilog=(
            "The slope: Lee et al. 2019 bound the relative kernel change by O(width^-1/2); the "
            "leading-order change is O(1/width) (Dyer & Gur-Ari 2020) and ReLU activation flips "
            "decay more slowly, so expect a slope between -1/2 and -1 (about -0.7 here). See the "
            "docs/theory.md, 'Reading the demo'."
        ),
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        default="lazy_monitor_runs",
        help="TensorBoard log directory, one sub-folder per run (default: ./lazy_monitor_runs)",
    )
    parser.add_argument(
        "--widths",
        type=parse_widths,
        default=list(DEFAULT_WIDTHS),
        metavar="W1,W2,...",
        help="hidden widths of the lazy sweep (default: 64,256,1024,4096)",
    )
    parser.add_argument(
        "--steps",
        type=_positive_int,
        default=DEFAULT_STEPS,
        metavar="N",
        help=f"full-batch gradient-descent steps per run (default: {DEFAULT_STEPS})",
    )
    parser.add_argument(
        "--seed",
        type=_non_negative_int,
        default=0,
        metavar="S",
        help="seed of the data and of the initialisations (default: 0)",
    )
    parser.add_argument(
        "--lr",
        type=_positive_float,
        default=DEFAULT_LR,
        help=f"learning rate of the lazy sweep (default: {DEFAULT_LR:g}; the non-lazy run uses "
        f"lr/alpha^2 = {DEFAULT_LR / NONLAZY_ALPHA**2:g} with it)",
    )
    parser.add_argument(
        "--inits",
        type=_positive_int,
        default=DEFAULT_INITS,
        metavar="K",
        help=f"initialisations per width of the lazy sweep (default: {DEFAULT_INITS}); the table "
        "shows their mean and the slope is fitted to all runs, which averages out the "
        "run-to-run noise of narrow nets",
    )
    scenario = parser.add_mutually_exclusive_group()
    scenario.add_argument(
        "--phase",
        action="store_true",
        help="instead: the lazy/rich phase diagram over width x output scale alpha (writes "
        "phase.png and phase.csv to --out; options --phase-*)",
    )
    scenario.add_argument(
        "--catapult",
        action="store_true",
        help="instead: one narrow net at learning rates below, inside and above the catapult "
        "window (Lewkowycz et al. 2020), with verdicts; options --catapult-*",
    )
    _phase.add_arguments(parser)  # --out and --seed are the demo's own
    _catapult.add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


@contextlib.contextmanager
def _quiet_lightning():
    """Hide Lightning's per-fit banners (device summary, model summary) and known warnings."""
    loggers = [
        logging.getLogger(n)
        for n in ("lightning.pytorch", "pytorch_lightning", "lightning.fabric", "lightning_fabric")
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            # One in-memory full batch per step: worker processes would only add start-up time.
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
            warnings.filterwarnings("ignore", message=".*treespec.*")  # Lightning vs newer torch
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _train(
    spec: DemoRun, x: Any, y: Any, probe: tuple[Any, Any], steps: int, seed: int, out_dir: Path
) -> None:
    """Fit one MLP with the monitor; fills ``spec.log_dir`` and ``spec.seconds``."""
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.loggers import TensorBoardLogger
    from torch.utils.data import DataLoader, Dataset

    from lazy_monitor.callbacks.pytorch_lightning import KernelRegimeMonitor
    from lazy_monitor.demo.models import mlp

    class _FullBatch(Dataset):
        """``steps`` copies of the whole training set: one epoch = full-batch GD for ``steps``."""

        def __len__(self) -> int:
            return steps

        def __getitem__(self, index: int) -> tuple[Any, Any]:
            return x, y

    class _Classifier(pl.LightningModule):
        def __init__(
            self, net: torch.nn.Module, width: int, lr: float, alpha: float, init: int
        ) -> None:
            super().__init__()
            # the sweep's variables: the monitor puts them in TensorBoard's HParams table
            self.save_hyperparameters({"width": width, "alpha": alpha, "lr": lr, "init": init})
            self.net = net
            self.lr = lr

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return self.net(inputs)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            inputs, labels = batch
            logits = self(inputs).squeeze(-1)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.float())
            self.log("train/loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=self.lr)

    net = mlp(2, spec.width, 1, depth=1, output_scale=spec.alpha, seed=seed)
    module = _Classifier(net, spec.width, spec.lr, spec.alpha, spec.init)
    # one folder per run, no version_N below it: the run name is what TensorBoard shows (the
    # HParams table cuts names after ~15 characters); _clear_previous removes an older demo's
    logger = TensorBoardLogger(
        save_dir=str(out_dir), name=spec.name, version="", default_hp_metric=False
    )
    monitor = KernelRegimeMonitor(
        probe=probe,
        every_n_steps=max(1, steps // _MEASUREMENTS),
        log_spaced_until=max(1, steps // _MEASUREMENTS),
        max_overhead=None,  # every scheduled measurement: the demo is about the curves
        submodule="net",
    )
    trainer_kwargs = dict(
        max_steps=steps,
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_model_summary=False,
        # a progress bar redirected to a file is hundreds of KB of carriage returns
        enable_progress_bar=sys.stdout.isatty(),
        log_every_n_steps=max(1, steps // _MEASUREMENTS),
        num_sanity_val_steps=0,
        deterministic=True,
    )
    loader = DataLoader(_FullBatch(), batch_size=None, shuffle=False)
    start = time.perf_counter()
    with _quiet_lightning():
        trainer = pl.Trainer(**trainer_kwargs)
        trainer.fit(module, train_dataloaders=loader)
    spec.seconds = time.perf_counter() - start
    spec.log_dir = Path(logger.log_dir)


def _read_back(spec: DemoRun) -> None:
    logged = load_run(spec.log_dir)
    for attr, tag in (
        ("ntk", "ntk/rel_change"),
        ("params", "params/rel_change"),
        ("lin", "lin/rel_error"),
    ):
        curve = logged.curves.get(tag)
        setattr(spec, attr, curve.final if curve is not None else math.nan)
    spec.verdict = verdict(logged)


def _plan(args: argparse.Namespace) -> list[DemoRun]:
    """The runs, named short (TensorBoard's HParams table shows ~15 characters) and so that they
    sort by width (zero-padded) with the non-lazy run first ("n" < "w")."""
    runs = [
        DemoRun(f"w{w:04d}_init{i}", w, 1.0, args.lr, True, Path(), init=i)
        for w in args.widths
        for i in range(args.inits)
    ]
    narrow = args.widths[0]
    runs.append(
        DemoRun(
            f"nonlazy_w{narrow:04d}",
            narrow,
            NONLAZY_ALPHA,
            args.lr / NONLAZY_ALPHA**2,
            False,
            Path(),
        )
    )
    return runs


#: What a run folder of an earlier demo holds (anything else: not ours to delete).
_DEMO_FILES = ("events.out.tfevents.", "hparams.yaml")


def _clear_previous(out_dir: Path, plan: list[DemoRun]) -> list[str]:
    """Remove the run folders of an earlier demo in ``out_dir`` (a second demo would otherwise add
    its curves to the same runs). Returns the names of folders that hold other files: those are
    left alone and reported."""
    blocked = []
    for spec in plan:
        folder = out_dir / spec.name
        if not folder.is_dir():
            continue
        files = [p for p in folder.rglob("*") if p.is_file()]
        if all(p.name.startswith(_DEMO_FILES) for p in files):
            shutil.rmtree(folder)
        else:
            blocked.append(str(folder))
    return blocked


def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Execute ``demo``: train, read the logs back, print the table and the slope (or the
    ``--phase`` / ``--catapult`` scenario)."""
    if getattr(args, "phase", False):
        return _phase.main(args, out, err)
    if getattr(args, "catapult", False):
        return _catapult.main(args, out, err)
    import torch

    from lazy_monitor.demo.datasets import two_spirals

    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        print(
            f"lazy-monitor demo: error: --out {str(out_dir)!r} exists and is not a directory",
            file=err,
        )
        return 2
    x, labels = two_spirals(_N_TRAIN, seed=args.seed)
    probe = (x[:_PROBE_SIZE], labels[:_PROBE_SIZE])
    plan = _plan(args)
    blocked = _clear_previous(out_dir, plan) if out_dir.is_dir() else []
    if blocked:
        print(
            f"lazy-monitor demo: error: {', '.join(blocked)} holds files that are not demo logs; "
            "choose another --out",
            file=err,
        )
        return 2
    print(
        f"lazy-monitor demo: two spirals, {_N_TRAIN} points, 1-hidden-layer ReLU MLP (NTK "
        f"parameterisation), full-batch GD for {args.steps} steps, probe of {_PROBE_SIZE} points, "
        f"seed {args.seed}; logs in {out_dir}",
        file=out,
        flush=True,
    )
    total = time.perf_counter()
    threads = torch.get_num_threads()
    # These nets are tiny: one thread is as fast on a quiet CPU and avoids OpenMP spin-waiting
    # (10-100x slower small matmuls) when the cores are shared with other jobs.
    torch.set_num_threads(1)
    try:
        for i, spec in enumerate(plan, 1):
            kind = (
                "lazy sweep"
                if spec.lazy_sweep
                else f"non-lazy: alpha={spec.alpha:g}, lr={spec.lr:g}"
            )
            print(
                f"[{i}/{len(plan)}] {spec.name} (width {spec.width}, {kind})", file=out, flush=True
            )
            init_seed = args.seed * 1000 + spec.init  # distinct per (seed, init)
            _train(spec, x, labels, probe, args.steps, init_seed, out_dir)
            _read_back(spec)
    finally:
        torch.set_num_threads(threads)

    headers = ["run", "width", "inits", "alpha", "lr", "ntk/rel_change", "params/rel_change",
               "lin/rel_error", "verdict"]  # fmt: skip
    rows = [_group_row(name, group) for name, group in _groups(plan)]
    print("", file=out)
    print(format_table(headers, rows), file=out)
    sweep = [s for s in plan if s.lazy_sweep]
    slope = loglog_slope([s.width for s in sweep], [s.ntk for s in sweep])
    print("", file=out)
    if math.isnan(slope):
        print(
            "log-log slope of ntk/rel_change vs width: undefined (a value is 0 or not finite)",
            file=out,
        )
    else:
        print(
            f"log-log slope of ntk/rel_change vs width: {slope:+.2f}  (theory: -1/2 bound, Lee et "
            "al. 2019; expect -1/2 to -1 for ReLU nets, docs/theory.md 'Reading the demo')",
            file=out,
        )
    print(f"trained {len(plan)} runs in {time.perf_counter() - total:.0f} s", file=out)
    print(f"view the curves:  tensorboard --logdir {_shell_path(out_dir)}", file=out)
    print(f"report / gate:    lazy-monitor report {_shell_path(out_dir)}", file=out, flush=True)
    return 0


def _groups(plan: list[DemoRun]) -> list[tuple[str, list[DemoRun]]]:
    """Runs grouped by configuration (all initialisations of one width), in plan order."""
    groups: dict[str, list[DemoRun]] = {}
    for spec in plan:
        groups.setdefault(spec.name.rsplit("_init", 1)[0], []).append(spec)
    return list(groups.items())


def _group_row(name: str, group: list[DemoRun]) -> list[str]:
    def mean(attr: str) -> str:
        return f"{sum(getattr(s, attr) for s in group) / len(group):.4g}"

    verdicts = [s.verdict for s in group]
    if len(set(verdicts)) == 1:
        shown = verdicts[0]
    else:
        shown = f"mixed ({verdicts.count('lazy')}/{len(group)} lazy)"
    first = group[0]
    return [name, str(first.width), str(len(group)), f"{first.alpha:g}", f"{first.lr:g}",
            mean("ntk"), mean("params"), mean("lin"), shown]  # fmt: skip


def _shell_path(path: Path) -> str:
    text = str(path)
    if any(c.isspace() for c in text) or "'" in text:
        return "'" + text.replace("'", "'\\''") + "'"
    return text if text else os.curdir

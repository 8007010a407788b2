"""Recommend a model size and precision for a memory budget (or the fewest bits for an accuracy),
from the scaling curves of a finished run. When the run has mixed-precision results, the best
(model, low format, Q_r, granularity) within the budget is listed too; with --predict MODEL, formats
that were never evaluated are ranked by the study's predictor, marked as predicted."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from kbit.analysis.advise import (
    BUDGET_HELP,
    best_for_budget,
    candidates,
    envelope_at,
    fewest_bits,
    format_bits,
    parse_budget,
)
from kbit.analysis.curves import ACCURACY_TARGET, build_curves


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``kbit advise``."""
    goal = parser.add_mutually_exclusive_group(required=True)
    goal.add_argument("--budget", help=f"memory budget for the weights: {BUDGET_HELP}")
    goal.add_argument("--target-acc", type=float, help="accuracy to reach with the fewest bits")
    parser.add_argument("--family", help="restrict to one model family (e.g. pythia)")
    parser.add_argument(
        "--laws",
        type=Path,
        default=Path("results/laws"),
        help="directory of the fit step's tables (default: results/laws)",
    )
    parser.add_argument(
        "--scores",
        type=Path,
        default=Path("results/tables/scores.parquet"),
        help="score table, used when the laws directory has no curves",
    )
    parser.add_argument(
        "--target",
        default=ACCURACY_TARGET,
        help=f"the metric to optimise (default: {ACCURACY_TARGET})",
    )
    parser.add_argument("--top", type=int, default=5, help="how many configurations to list")
    parser.add_argument(
        "--results",
        type=Path,
        default=Path("results"),
        help="the run's results folder, for its mixed-precision and predictor tables",
    )
    parser.add_argument(
        "--predict",
        metavar="MODEL",
        help="rank formats never evaluated on MODEL by the study's predictor (with --budget)",
    )


def _read(path: Path) -> pd.DataFrame | None:
    return pd.read_parquet(path) if path.exists() else None


def run(args: argparse.Namespace) -> int:
    """Print the recommendation; exit status 2 with a message on bad input or missing results."""
    try:
        curves = _read(args.laws / "curves.parquet")
        if curves is None:
            scores = _read(args.scores)
            if scores is None:
                raise ValueError(
                    f"neither {args.laws / 'curves.parquet'} nor {args.scores} "
                    "exists: run the workflow (snakemake) first or pass --laws/--scores"
                )
            curves = build_curves(scores)
        boot = _read(args.laws / "bootstrap.parquet")
        cands = candidates(curves, boot, args.family, args.target)
        if args.budget is not None:
            budget = parse_budget(args.budget)
            recs = best_for_budget(cands, budget, args.top)
            print(
                f"Best evaluated configurations within {format_bits(budget)} "
                f"({budget:.3g} bits), by {args.target}:"
            )
            for i, r in enumerate(recs, 1):
                print(f"  {i}. {r.describe()}")
            for line in envelope_at(curves, boot, budget, args.family, args.target):
                print(f"  interpolated: {line}")
            _print_mixed(args, budget)
            if args.predict:
                _print_predicted(args, budget)
        else:
            recs = fewest_bits(cands, args.target_acc, args.top)
            print(f"Fewest bits reaching {args.target} >= {args.target_acc}:")
            for i, r in enumerate(recs, 1):
                sure = (
                    ""
                    if r.ci_low != r.ci_low
                    else (
                        " (interval clears the target)"
                        if r.ci_low >= args.target_acc
                        else " (interval does not clear the target)"
                    )
                )
                print(f"  {i}. {r.describe()}{sure}")
    except (ValueError, FileNotFoundError) as e:
        print(f"kbit advise: {e}", file=sys.stderr)
        return 2
    return 0


def _print_mixed(args: argparse.Namespace, budget: float) -> None:
    """The best measured mixed-precision configurations within the budget, if the run has any."""
    from kbit.analysis.mixed import best_mixed_for_budget

    mixed = _read(args.results / "mixed" / "mixed_curves.parquet")
    if mixed is None or mixed.empty:
        return
    try:
        recs = best_mixed_for_budget(mixed, budget, family=args.family, top=args.top)
    except ValueError as e:
        print(f"  mixed precision: {e}")
        return
    print("Best evaluated mixed-precision configurations (low format, Q_r, granularity):")
    for i, r in enumerate(recs, 1):
        print(f"  {i}. {r.describe()}")


def _print_predicted(args: argparse.Namespace, budget: float) -> None:
    """Formats never evaluated on the model, ranked by the predictor (PREDICTED, not measured),
    and how often the predicted best was the measured best on the study's own data."""
    from kbit.analysis.predict import rank_formats

    table = _read(args.results / "predict" / "features.parquet")
    if table is None:
        raise ValueError(
            f"{args.results / 'predict' / 'features.parquet'} does not exist: run the workflow "
            "with predict.enabled (the default) first"
        )
    ranked = rank_formats(table, args.predict, budget, top=args.top)
    print(f"PREDICTED (never evaluated) formats for {args.predict}, best first:")
    for i, r in enumerate(ranked.itertuples(), 1):
        flag = " (extrapolated)" if getattr(r, "extrapolated", False) else ""
        print(
            f"  {i}. {r.quant}: predicted {r.pred:.4f} [{r.lo:.4f}, {r.hi:.4f}], "
            f"{format_bits(r.total_bits)}{flag}"
        )
    check = _read(args.results / "predict" / "ranking_check.parquet")
    if check is not None and len(check):
        hits = int(check["hit"].sum())
        print(
            f"  check on this study: the predicted best was the measured best in {hits} of "
            f"{len(check)} budgets"
        )

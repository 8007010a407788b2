"""Recommend a model size and precision for a memory budget (or the fewest bits for an accuracy),
from the scaling curves of a finished run."""

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

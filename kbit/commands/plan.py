"""What a study will cost before it starts: jobs per rule (Snakemake's dry run), disk per stage,
GPU hours per stage and per model (calibrated by an earlier run's runs table when there is one),
and per model the cheaper job layout. Exit status 2 on a bad config, 1 when the dry run failed
(the rest of the plan is still printed)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``kbit plan``."""
    from kbit.plan import ACCELERATORS, DISK_BYTES_PER_S, NET_BYTES_PER_S

    parser.add_argument("config", type=Path, help="study config (YAML), e.g. config/paper.yaml")
    parser.add_argument(
        "--runs",
        type=Path,
        help="runs table of an earlier run to calibrate times "
        "(default: <results>/tables/runs.parquet when it exists)",
    )
    parser.add_argument(
        "--gpu",
        choices=sorted(ACCELERATORS),
        help="accelerator to plan for (default: cpu for an eval.device: cpu study, else h100)",
    )
    parser.add_argument("--format", choices=("md", "json"), default="md", help="output format")
    parser.add_argument(
        "--utilisation",
        type=float,
        help="fixed fraction of the peak reached while scoring (default: grows with model size)",
    )
    parser.add_argument(
        "--disk-gbps",
        type=float,
        default=DISK_BYTES_PER_S / 1e9,
        help="disk read bandwidth in GB/s for model loads (default: %(default)s)",
    )
    parser.add_argument(
        "--net-gbps",
        type=float,
        default=NET_BYTES_PER_S / 1e9,
        help="download bandwidth in GB/s (default: %(default)s)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="local task files standing in for hub tasks (data_dir: null); default: the shared "
        "data folder ($KBIT_SHARED_DATA or ../shared/data)/eval",
    )
    parser.add_argument(
        "--tokenizer",
        action="append",
        default=[],
        metavar="[MODEL|FAMILY=]PATH",
        help="tokenizer for a model or family (a bare PATH: for every model without its own); "
        "repeatable",
    )
    parser.add_argument(
        "--tokenizers-dir",
        action="append",
        type=Path,
        metavar="DIR",
        help="folder of family tokenizers (gpt2/, gpt-neox-20b/); default: the shared data "
        "folder's tokenizers/; repeatable",
    )
    parser.add_argument("--cache-dir", type=Path, help="cache folder (default ~/.cache/kbit/plan)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    parser.add_argument("--no-jobs", action="store_true", help="skip Snakemake's dry run")


def _tokenizer_overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, path = item.partition("=")
        if not sep:
            key, path = "*", item
        if not Path(path).exists():
            raise ValueError(f"--tokenizer {item}: {path} does not exist")
        out[key] = path
    return out


def run(args: argparse.Namespace) -> int:
    """Print the plan; 2 on a bad config or option, 1 when the dry run failed."""
    import yaml

    from kbit.plan import PlanOptions, default_cache_dir, make_plan, plan_json, plan_markdown
    from kbit.study import ConfigError, load_study

    try:
        if not args.config.is_file():
            raise ValueError(f"config file {args.config} does not exist")
        study = load_study(args.config)
        if args.utilisation is not None and not 0 < args.utilisation <= 1:
            raise ValueError(f"--utilisation {args.utilisation}: must be in (0, 1]")
        for name in ("disk_gbps", "net_gbps"):
            if getattr(args, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        for folder in [args.data_dir, *(args.tokenizers_dir or [])]:
            if folder is not None and not folder.is_dir():
                raise ValueError(f"{folder} is not a directory")
        opts = PlanOptions(
            accelerator=args.gpu,
            runs=args.runs,
            utilisation=args.utilisation,
            disk_bytes_per_s=args.disk_gbps * 1e9,
            net_bytes_per_s=args.net_gbps * 1e9,
            data_dir=args.data_dir,
            tokenizer_dirs=args.tokenizers_dir,
            tokenizers=_tokenizer_overrides(args.tokenizer),
            cache_dir=None if args.no_cache else (args.cache_dir or default_cache_dir()),
            jobs=not args.no_jobs,
        )
    except (ConfigError, ValueError, FileNotFoundError, yaml.YAMLError) as err:
        print(f"kbit plan: {err}", file=sys.stderr)
        return 2
    try:
        plan = make_plan(study, args.config, opts)
    except FileNotFoundError as err:  # a --runs table or --data-dir that is not there
        print(f"kbit plan: {err}", file=sys.stderr)
        return 2
    print(plan_json(plan) if args.format == "json" else plan_markdown(plan), end="")
    jobs = plan.get("jobs")
    if jobs and jobs.get("error"):
        print(f"kbit plan: the dry run failed: {jobs['error']}", file=sys.stderr)
        return 1
    return 0

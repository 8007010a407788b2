"""Quantize a local or hub model into a packed k-bit artifact and print its bit accounting.

MODEL is a local model directory (config.json + *.safetensors) or a Hugging Face hub id; hub
snapshots fetch safetensors, config and tokenizer files only (pickle-only repositories are
refused) and honour HF_HUB_OFFLINE. The artifact (model.safetensors + kbit.json) is written to
--out atomically; reload it with kbit.artifact.load_artifact(out, base_model).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from kbit.settings import QuantizeOptions
from kbit.spec import QuantSpec, SpecError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``kbit quantize``."""
    parser.add_argument("model", help="local model directory or Hugging Face hub id")
    parser.add_argument(
        "--spec", required=True, help="quant spec id, e.g. float4-e3-b64, int3-b64-o0.02, fp16"
    )
    parser.add_argument("--out", required=True, type=Path, help="artifact directory to write")
    parser.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    parser.add_argument("--device", default="cpu", help="device to quantize on: cpu or cuda[:N]")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float16", "bfloat16", "float32"),
        help="dtype to load the model in (auto: the checkpoint's)",
    )
    parser.add_argument(
        "--include",
        action="append",
        default=None,
        metavar="RE",
        help="quantize only parameters/modules matching this regex (repeatable)",
    )
    parser.add_argument(
        "--exclude",
        action="append",
        default=None,
        metavar="RE",
        help="never quantize parameters/modules matching this regex (repeatable)",
    )
    parser.add_argument(
        "--quantize-embeddings", action="store_true", help="also quantize embedding tables"
    )
    parser.add_argument("--quantize-lm-head", action="store_true", help="also quantize the LM head")


def resolve_model(model: str, revision: str | None = None) -> Path:
    """A local directory as is, otherwise a hub snapshot in the local cache (safetensors only)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise FileNotFoundError(f"{model} is not a model directory")
    from kbit.sources import hub_snapshot

    return hub_snapshot(model, revision)


def format_report(meta: dict) -> str:
    """The bit accounting and SQNR of an artifact, as printed by ``kbit quantize``."""
    s = meta["summary"]
    lines = [
        f"quant            {meta['quant']}",
        f"parameters       {s['n_params']:,}",
        f"quantized        {s['n_params_quantized']:,} ({100 * s['fraction_quantized']:.2f}%)",
        f"total bits       {s['total_bits']:,}",
        f"size             {s['total_bits'] / 8 / 1e9:.4f} GB",
        f"bits per param   {s['bits_per_param']:.4f}",
        f"vs 16-bit        {s['total_bits'] / s['baseline_bits']:.4f}x "
        f"({s['baseline_bits'] / 8 / 1e9:.4f} GB at 16 bit)",
    ]
    mean, low = s.get("sqnr_db_mean", math.nan), s.get("sqnr_db_min", math.nan)
    if s["n_params_quantized"]:
        lines.append(f"SQNR             mean {mean:.2f} dB, min {low:.2f} dB")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Quantize, write the artifact, print the accounting; 2 on bad input."""
    from kbit.artifact import ArtifactError, quantize_to_artifact
    from kbit.loading import ModelLoadError
    from kbit.sources import ModelSourceError

    try:
        spec = QuantSpec.parse(args.spec)
        model_dir = resolve_model(args.model, args.revision)
        meta = quantize_to_artifact(
            model_dir,
            spec,
            args.out,
            device=args.device,
            dtype=args.dtype,
            options=QuantizeOptions(
                include=args.include,
                exclude=args.exclude,
                quantize_embeddings=args.quantize_embeddings,
                quantize_lm_head=args.quantize_lm_head,
            ),
        )
    except (
        SpecError,
        ArtifactError,
        ModelLoadError,
        ModelSourceError,
        FileNotFoundError,
        ValueError,
    ) as err:
        print(f"kbit quantize: error: {err}", file=sys.stderr)
        return 2
    print(format_report(meta))
    print(f"artifact         {args.out}")
    return 0

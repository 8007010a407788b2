"""The kernel figures README.md quotes, recomputed from one GPU's table (bench_quant.py's JSON).

For each group of codebooks: the range of fake quantization, quantize-to-packed and dequantize
over every block size, as % of the device copy measured in the same run, and how many rows
meet the targets (fake >= 85%, packing >= 75%).

Usage::

    python benchmarks/summarize_quant.py benchmarks/results/quant_nvidia_h200.json \
        [benchmarks/results/quant_nvidia_h200_mx.json ...]

Rows of a later file (the same device, a partial grid timed again with ``--families``) take
the place of the first file's rows of the same codebook and block size.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

#: README groups: (label, predicate on a row)
GROUPS = (
    ("int, k = 3, 4, 8", lambda r: r["family"] == "int"),
    ("float, nf, quantile, dynamic at k <= 4",
     lambda r: r["family"] in ("float", "nf", "quantile", "dynamic") and r["bits"] <= 4),
    ("float8", lambda r: r["family"] == "float" and r["bits"] == 8),
    ("nf8", lambda r: r["family"] == "nf" and r["bits"] == 8),
    ("quantile8", lambda r: r["family"] == "quantile" and r["bits"] == 8),
    ("dynamic8", lambda r: r["family"] == "dynamic" and r["bits"] == 8),
    ("MX 4- and 8-bit (mxfp4/8, mxint4/8)",
     lambda r: r["case"] in ("mxfp4", "mxint4", "mxfp8", "mxfp8-e5", "mxint8")),
    ("mxfp6 (both splits)", lambda r: r["case"].startswith("mxfp6")),
    ("nvfp4", lambda r: r["case"] == "nvfp4"),
)  # fmt: skip
FAKE_TARGET, PACK_TARGET = 85.0, 75.0


def _range(rows: list[dict], key: str) -> str:
    vals = [r[key] for r in rows if key in r]
    if not vals:
        return "-"
    lo, hi = min(vals), max(vals)
    return f"{lo:.0f}%" if round(lo) == round(hi) else f"{lo:.0f}-{hi:.0f}%"


def summary(res: dict) -> str:
    """A markdown table: one line per group, ranges over every block size >= 32."""
    rows = [r for r in res["rows"] if "error" not in r and r["block"] >= 32]
    lines = [
        f"{res['device']}, copy {res['copy_gbs']:.0f} GB/s, {res['numel']:,} fp16 values, "
        f"B = {', '.join(str(b) for b in sorted({r['block'] for r in rows}))}; % of copy:",
        "",
        "| codebooks | fake quantize | quantize to packed | dequantize |",
        "|---|---|---|---|",
    ]
    for label, pick in GROUPS:
        g = [r for r in rows if pick(r)]
        if g:
            lines.append(f"| {label} | {_range(g, 'fake_pct')} | {_range(g, 'quant_pct')} "
                         f"| {_range(g, 'dequant_pct')} |")  # fmt: skip
    fake_ok = sum(r["fake_pct"] >= FAKE_TARGET for r in rows)
    pack_ok = sum(r["quant_pct"] >= PACK_TARGET for r in rows)
    lines += [
        "",
        f"Targets: fake >= {FAKE_TARGET:.0f}% on {fake_ok} of {len(rows)} rows, packing >= "
        f"{PACK_TARGET:.0f}% on {pack_ok} of {len(rows)}.",
    ]
    return "\n".join(lines) + "\n"


def merged(results: list[dict]) -> dict:
    """The first result with its rows replaced by later results' rows of the same (case,
    block); every file must come from the same device."""
    base = dict(results[0])
    for other in results[1:]:
        if other["device"] != base["device"]:
            raise SystemExit(f"{other['device']} is not {base['device']}: one GPU per table")
    later = {(r["case"], r["block"]): r for res in results[1:] for r in res["rows"]}
    rows = [later.pop((r["case"], r["block"]), r) for r in base["rows"]]
    base["rows"] = rows + list(later.values())
    return base


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    files = [json.loads(Path(f).read_text()) for f in sys.argv[1:]]
    print(summary(merged(files)), end="")

"""One plotting style for every figure: seaborn paper context, colour-blind-safe palette."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # figures are files; never require a display

import matplotlib.pyplot as plt
import seaborn as sns

PALETTE = "colorblind"
#: fixed colour per precision, so 4-bit is the same colour in every figure
PRECISION_ORDER = (3, 4, 5, 6, 7, 8, 16, 2)
MARKERS = ("o", "s", "D", "^", "v", "P", "X", "*", "h", "<")


def apply() -> None:
    """Set the shared style (idempotent)."""
    sns.set_theme(context="paper", style="whitegrid", palette=PALETTE, font_scale=1.1)
    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 200, "savefig.bbox": "tight"})


def precision_colors() -> dict[int, tuple]:
    """Colour of each bit precision."""
    pal = sns.color_palette(PALETTE, len(PRECISION_ORDER))
    return dict(zip(PRECISION_ORDER, pal, strict=True))


def series_colors(n: int) -> list[tuple]:
    """``n`` distinct colour-blind-safe colours for curves that are not precisions."""
    return list(sns.color_palette(PALETTE, max(n, 1)))

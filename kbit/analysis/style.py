"""One plotting style for every figure: seaborn paper context, colour-blind-safe colours.

Precisions keep one colour, marker and line style in every figure. The colours are the
Okabe-Ito palette (designed to stay apart under the common colour-vision deficiencies) assigned
so that neighbouring precisions and 4 vs 8 bits are the most distinct pairs: 4-bit, the paper's
optimum, is black; the 16-bit baseline is a dashed dark grey. :func:`color_distance` measures
what that buys (CIE76 distance, optionally after simulating a colour-vision deficiency), so the
tests can check the palette rather than trust it.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # figures are files; never require a display

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
from matplotlib.colors import to_rgb

#: Okabe & Ito (2008) colour-blind-safe colours
OKABE_ITO = {
    "black": "#000000",
    "orange": "#E69F00",
    "sky_blue": "#56B4E9",
    "green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "purple": "#CC79A7",
}
#: fixed colour per precision, so 4-bit is the same colour in every figure
PRECISION_COLORS = {
    2: OKABE_ITO["green"],
    3: OKABE_ITO["purple"],
    4: OKABE_ITO["black"],
    5: OKABE_ITO["vermillion"],
    6: OKABE_ITO["blue"],
    7: OKABE_ITO["orange"],
    8: OKABE_ITO["sky_blue"],
    16: "#555555",
}
PRECISION_MARKERS = {2: "v", 3: "o", 4: "s", 5: "D", 6: "^", 7: "P", 8: "X", 16: "*"}
PRECISION_LINESTYLES = {16: "--"}
#: colours for curves that are not precisions (block sizes, data types, families), in order
SERIES_COLORS = tuple(
    OKABE_ITO[c] for c in ("blue", "vermillion", "green", "orange", "purple", "sky_blue", "black")
)
MARKERS = ("o", "s", "D", "^", "v", "P", "X", "*", "h", "<")
LEGEND_FONTSIZE = 8


def apply() -> None:
    """Set the shared style (idempotent)."""
    sns.set_theme(context="paper", style="whitegrid", font_scale=1.1)
    plt.rcParams.update(
        {
            "figure.dpi": 110,
            "savefig.dpi": 200,
            "savefig.bbox": "tight",
            "legend.fontsize": LEGEND_FONTSIZE,
            "legend.title_fontsize": LEGEND_FONTSIZE + 1,
            "axes.prop_cycle": matplotlib.cycler(color=list(SERIES_COLORS)),
        }
    )


def precision_colors() -> dict[int, str]:
    """Colour of each bit precision (16 = the baseline)."""
    return dict(PRECISION_COLORS)


def precision_style(precision: int) -> dict:
    """Matplotlib keyword arguments (colour, marker, line style) of one precision's curve."""
    p = int(precision)
    return {
        "color": PRECISION_COLORS.get(p, "#999999"),
        "marker": PRECISION_MARKERS.get(p, "o"),
        "linestyle": PRECISION_LINESTYLES.get(p, "-"),
    }


def series_colors(n: int) -> list[str]:
    """``n`` distinct colour-blind-safe colours for curves that are not precisions."""
    if n <= len(SERIES_COLORS):
        return list(SERIES_COLORS[: max(n, 1)])
    return [matplotlib.colors.to_hex(c) for c in sns.color_palette("colorblind", n)]


# ----------------------------------------------------------------------------- colour checks
#: Machado, Oliveira & Fernandes (2009) simulation matrices at severity 1, in linear RGB
CVD_MATRICES = {
    "normal": np.eye(3),
    "protanopia": np.array(
        [
            [0.152286, 1.052583, -0.204868],
            [0.114503, 0.786281, 0.099216],
            [-0.003882, -0.048116, 1.051998],
        ]
    ),
    "deuteranopia": np.array(
        [
            [0.367322, 0.860646, -0.227968],
            [0.280085, 0.672501, 0.047413],
            [-0.011820, 0.042940, 0.968881],
        ]
    ),
    "tritanopia": np.array(
        [
            [1.255528, -0.076749, -0.178779],
            [-0.078411, 0.930809, 0.147602],
            [0.004733, 0.691367, 0.303900],
        ]
    ),
}


def _linear(rgb: np.ndarray) -> np.ndarray:
    return np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)


def _lab(linear_rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of a linear sRGB triple."""
    xyz = np.array(
        [[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]
    ) @ np.clip(linear_rgb, 0, 1)
    xyz = xyz / np.array([0.95047, 1.0, 1.08883])
    d = 6 / 29
    f = np.where(xyz > d**3, np.cbrt(xyz), xyz / (3 * d * d) + 4 / 29)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def color_distance(a, b, vision: str = "normal") -> float:
    """CIE76 distance (Delta E) of two colours as seen with ``vision`` (see CVD_MATRICES).

    About 2 is just noticeable; curves need tens to be told apart at a glance.
    """
    m = CVD_MATRICES[vision]
    la = _lab(m @ _linear(np.asarray(to_rgb(a))))
    lb = _lab(m @ _linear(np.asarray(to_rgb(b))))
    return float(np.linalg.norm(la - lb))

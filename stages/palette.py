"""One colour per detector family, the same in every figure of the report.

The mapping is fixed by the order of ``stages.methods.FAMILIES`` (not by which families a
run happens to have), so PatchCore is the same colour in the ROC curves, Figure 4, the
trained models' curves and any later report. Several experiments of one family in one
panel share its hue and differ by shade (``family_shades``) and line style.
"""

from __future__ import annotations

from matplotlib.colors import to_hex, to_rgb

from stages.methods import FAMILIES

# Strong, distinct colours (no pale ones: a thin line must stay visible on white), in
# ``FAMILIES`` order: the classic families tab10's, then the patch, anomalib,
# reconstruction and labelled families darker ones from tab20b and Dark2.
_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
            "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#1b9e77", "#6a3d9a", "#8c6d31",
            "#637939", "#7b4173", "#843c39", "#c51b7d", "#e6ab02", "#aaaaaa", "#555555"]  # fmt: skip
FAMILY_COLOURS: dict[str, str] = {
    name: _COLOURS[i % len(_COLOURS)] for i, name in enumerate(FAMILIES)
}
UNKNOWN = "#555555"  # a family stored by an older version that no longer exists
LINE_STYLES = ("-", "--", "-.", ":")


def family_colour(name: str) -> str:
    """The hex colour of detector family ``name`` (grey for an unknown one)."""
    return FAMILY_COLOURS.get(name, UNKNOWN)


def family_shades(name: str, n: int) -> list[str]:
    """``n`` shades of the family's colour, the first the colour itself, then alternately
    lighter and darker (for several experiments of one family in one panel); lighter
    first, as several of the colours are dark already."""
    r, g, b = to_rgb(family_colour(name))
    out = []
    for i in range(n):
        step = (i + 1) // 2 * 0.3
        if i % 2:  # lighter
            out.append(to_hex((r + (1 - r) * step, g + (1 - g) * step, b + (1 - b) * step)))
        else:  # darker (i = 0: the colour itself)
            out.append(to_hex((r * (1 - step), g * (1 - step), b * (1 - step))))
    return out

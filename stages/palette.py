"""One colour per detector family, the same in every figure of the report.

The mapping is fixed by the order of ``stages.methods.FAMILIES`` (not by which families a
run happens to have), so PatchCore is the same colour in the ROC curves, Figure 4, the
trained models' curves and any later report. Several experiments of one family in one
panel share its hue and differ by shade (``family_shades``) and line style.
"""

from __future__ import annotations

from matplotlib import colormaps
from matplotlib.colors import to_hex, to_rgb

from stages.methods import FAMILIES

# tab20's ten strong colours, then its ten light ones, then tab20b's strong ones: distinct
# hues for the first ten families, more for the rest (21 families today).
_TAB20 = [to_hex(c) for c in colormaps["tab20"].colors]
_TAB20B = [to_hex(c) for c in colormaps["tab20b"].colors]
_COLOURS = _TAB20[0::2] + _TAB20[1::2] + _TAB20B[0::4]
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
    darker and lighter (for several experiments of one family in one panel)."""
    r, g, b = to_rgb(family_colour(name))
    out = []
    for i in range(n):
        step = (i + 1) // 2 * 0.22
        if i % 2:  # darker
            out.append(to_hex((r * (1 - step), g * (1 - step), b * (1 - step))))
        else:  # lighter (i = 0: the colour itself)
            out.append(to_hex((r + (1 - r) * step, g + (1 - g) * step, b + (1 - b) * step)))
    return out

"""Figures: token-grid maps over images and the bounce strip (needs the ``viz`` extra).

matplotlib is imported lazily, with the Agg backend, only when a figure is drawn.
"""

from ._overlay import bounce_strip as bounce_strip
from ._overlay import overlay as overlay
from ._overlay import save_png as save_png
from ._overlay import states_figure as states_figure

__all__ = ["bounce_strip", "overlay", "save_png", "states_figure"]

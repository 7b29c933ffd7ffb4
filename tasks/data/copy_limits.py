"""When two images count as the same image (``tasks/data/near_copies.py`` measures and applies them), kept apart from
it so the flow's parameters and the command line's help quote them without importing NumPy."""

from __future__ import annotations

PIXEL_TOLERANCE = 32  # of 255: a pixel off by no more than this is the same pixel (noise, rounding, a re-encoding)
NEAR_COPY_PIXELS = 8  # at most this many pixels differing by more than PIXEL_TOLERANCE: a near copy
RANKED_COPY_PIXELS = 4  # … or at most this many once both images are ranked by intensity (near_copies.intensity_ranked)

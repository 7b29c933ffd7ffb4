"""How large an incoming batch may be: the parser's limits (``tasks/data/batch_format.py``), kept apart from it so
the flow's parameters (``max_images_per_night``'s default) read them without importing NumPy or pyarrow."""

from __future__ import annotations

PIXELS = 28 * 28
MAX_BATCH_BYTES = 64 << 20  # one file as it lies in the incoming location
MAX_BATCH_ROWS = 100_000

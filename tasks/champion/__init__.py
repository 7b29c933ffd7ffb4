"""Stage 4, champion: whether tonight's model replaces the champion. It decides by the gate's rules, slice by slice
(balanced accuracy floor, regression margin, per-digit drops, McNemar's paired test), keeps the champion pointer
(compare-and-swap on ``champion.json``) and records every promotion, refusal and operator's rollback.
It uses ``data``, ``training`` and ``evaluation``.
"""

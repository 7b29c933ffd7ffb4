"""The data dictionary, generated from ``storage/tables.py``'s schemas: the docs site prints this, never a hand copy.

A column's meaning is its field's ``description`` metadata, next to its type, so adding or renaming a column
without saying what it holds shows up as an empty cell in the docs (and fails ``tests/test_docs.py``).
"""

from __future__ import annotations

import pyarrow as pa

from storage.tables import RUN_ID, SCHEMA_VERSION, SCHEMAS

PURPOSE = {
    "runs": "One row per run: what it trained on, the model it made, its figures, and the gate's outcome.",
    "promotions": "One row per gate or operator decision. `decision == 'promoted'` rows are the champion history: "
    "one row per change of the champion pointer, the last one by `decided_at` is the champion now.",
    "confusion": "Per evaluation and slice: every (true, predicted) pair with its count.",
    "per_class": "Per evaluation and slice: each digit's recall with its interval, precision and F1.",
    "predictions": "Per evaluation and slice: every image's prediction and probabilities (on `mnist-test` all 10 000 "
    "test images, `sampled` marking the balanced sample that `confusion` and `per_class` count).",
    "batches": "One row per decision on an incoming batch (a night's ingest, or an operator's release/quarantine); "
    "a night that got no batch writes an empty partition, so the table always has files to read.",
}


def _kind(kind: pa.DataType) -> str:
    if pa.types.is_timestamp(kind):
        return f"timestamp ({kind.tz})"
    if pa.types.is_fixed_size_list(kind):
        return f"list of {kind.list_size} {kind.value_type}"
    if pa.types.is_list(kind) and pa.types.is_struct(kind.value_type):
        return "list of struct (" + ", ".join(f.name for f in kind.value_type) + ")"
    return str(kind)


def describe(field: pa.Field) -> str:
    return (field.metadata or {}).get(b"description", b"").decode()


def data_dictionary() -> str:
    """Markdown: one section per table, one row per column (name, type, null allowed, meaning)."""
    out = [
        f"Schema version **{SCHEMA_VERSION}**. Every table also has `run_id` (string, from the partition path: the "
        "night that wrote the row, null for an operator's decision).",
        "",
    ]
    for table, fields in SCHEMAS.items():
        out += [f"### `{table}`", "", PURPOSE[table], "", "| column | type | null | meaning |", "|---|---|---|---|"]
        for field in [*fields, RUN_ID]:
            out.append(f"| `{field.name}` | {_kind(field.type)} | {'yes' if field.nullable else 'no'} | {describe(field)} |")
        out.append("")
    return "\n".join(out)

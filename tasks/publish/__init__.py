"""Stage 6, publish: what the night leaves for people and downstream readers. It decides which rows a run adds to
the Parquet tables (runs, confusion, per-class, predictions, promotions, batches; their schemas are ``storage``'s)
and what the Markdown report with its figures says. It may use every earlier stage.
"""

"""The pipeline's work as plain functions, importable and testable without Prefect: one folder per stage, in the
order a night runs them. ``data`` fetches MNIST and says which images each slice holds; ``training`` turns a
dataset and a configuration into a model; ``evaluation`` measures a model on those slices; ``champion`` decides
whether it replaces tonight's champion; ``intake`` decides which incoming batches may train; ``publish`` writes
the tables and the report. A stage imports only ``storage`` and the stages before it (``tests/test_layout.py``).
"""

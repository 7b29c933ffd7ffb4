"""One step of the pipeline per module, as plain functions: importable and testable without Prefect."""

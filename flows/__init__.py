"""The Prefect flows: the pipeline as one readable sentence, and its command line."""

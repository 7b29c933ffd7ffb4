"""The Prefect side: ``night/`` (the pipeline as one readable sentence and what decides a run), ``stack/`` (what
serves it), and the command line on top (``cli.py``)."""

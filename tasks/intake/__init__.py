"""Stage 5, intake: which incoming batches of labelled images may train. It decides, per batch, format, leakage
against the held-out slices, drift against MNIST's base training set and label quality as judged by the champion;
a batch is accepted (split into a training and a holdout share) or quarantined, never able to stop the night.
It uses ``data``, ``evaluation`` and ``champion``.
"""

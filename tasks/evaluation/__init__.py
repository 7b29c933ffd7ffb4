"""Stage 3, evaluation: what a model gets right. It decides the balanced stratified test sample, predicts every
slice (test, ``mnist-selection``, new data), computes the confusion matrix, per-digit recall with Wilson intervals,
and renders the figures. It uses ``data`` for the images and ``training`` to load the model.
"""

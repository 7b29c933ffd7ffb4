"""Stage 1, data: where MNIST comes from and which images are which. It decides the dataset's version (the
digest every later key starts from), how the training images are split into base training, the held-back pool
and the ``mnist-selection`` slice that the gate decides on, and what an accepted batch's stored share looks like.
It reads and writes through ``storage`` only.
"""

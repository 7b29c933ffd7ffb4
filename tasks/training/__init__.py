"""Stage 2, training: a dataset and a ``TrainConfig`` in, one stored ``.keras`` model out. It decides the network
(the seed notebook's CNN, or the stronger option), the precision and device, which Keras backend trains, and the
training key under which a model is reused instead of retrained; an interrupted training resumes from its
checkpoint. It uses the ``data`` stage for the images.
"""

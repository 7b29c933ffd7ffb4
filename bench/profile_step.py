"""Where one epoch of our seed-network step goes on this machine: each layer's forward and backward pass,
the loss, the optimizer (Adam with its moving average), the input pipeline, and what is left (Keras'
loop, Python, TensorFlow's dispatch).

Each part is timed alone, in a compiled ``tf.function`` at the training batch size and dtype policy, less
the cost of calling a compiled function at all, and scaled to one epoch's steps; the whole is one epoch of
``model.fit`` as ``tasks/training/train.py`` compiles it (without validation and checkpoints). Parts timed alone
miss the fusion TensorFlow does across layers, so they can add up to more than the whole. Prints
a table on stdout (``make profile``). Figures vary ±10–30 % on a shared machine; compare shares, not digits.
``--record`` also writes the figures, with the date, commit, CPU model and load it ran under, to
``docs/measured/profile.json``, from which the docs build renders docs/benchmarks.md's profile table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from measured_record import provenance, write_record  # noqa: E402 (bench/, beside this script)

from storage import Store  # noqa: E402
from tasks.data.fetch import fetch_mnist, load_mnist  # noqa: E402
from tasks.data.training_images import staged_training_images  # noqa: E402
from tasks.training.input_pipeline import STEPS_PER_EXECUTION, VALIDATION_SPLIT, input_pipeline  # noqa: E402
from tasks.training.keras_runtime import import_keras  # noqa: E402
from tasks.training.model import build_model, make_optimizer, scale  # noqa: E402
from tasks.training.precision import dtype_policy, select_device  # noqa: E402

BATCH = 128
REPEATS = 150


def timed(fn, repeats: int = REPEATS) -> float:
    """Seconds per call, after two warm-up calls (tracing and first-run allocation excluded)."""
    fn()
    fn()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true", help="also write docs/measured/profile.json for the docs")
    args = parser.parse_args()
    measured = provenance()
    keras = import_keras()
    import tensorflow as tf

    store = Store(os.environ.get("MNIST_STORE", str(REPO / "artifacts")))
    mnist = load_mnist(store, fetch_mnist(store, log=lambda _: None))
    n_train = len(mnist.x_train) - int(round(len(mnist.x_train) * VALIDATION_SPLIT))
    x, y = scale(mnist.x_train[:BATCH]), mnist.y_train[:BATCH]  # one batch, for the parts timed alone
    steps = int(np.ceil(n_train / BATCH))
    device, policy = select_device("auto")
    rows: list[tuple[str, float]] = []

    with (
        staged_training_images(store, mnist.x_train, mnist.y_train, np.arange(n_train), []) as staged,
        dtype_policy(policy),
    ):

        def batches():
            return input_pipeline(staged, np.arange(n_train), BATCH, 0, training=True, targets=lambda labels: labels)

        model = build_model("seed")
        model.compile(
            optimizer=make_optimizer("seed", 1e-3, 15 * steps),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
            steps_per_execution=STEPS_PER_EXECUTION,
        )
        seconds: list[float] = []

        class Clock(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self.t0 = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                seconds.append(time.perf_counter() - self.t0)

        model.fit(batches(), epochs=3, callbacks=[Clock()], verbose=0, shuffle=False)
        epoch = float(np.median(seconds[1:]))  # the first epoch traces and compiles

        batch_x = tf.constant(x[:BATCH])
        batch_y = tf.constant(y[:BATCH])

        @tf.function
        def nothing():
            return batch_y

        dispatch = timed(nothing)  # what calling a compiled function costs by itself: taken off every part below

        def per_epoch(fn) -> float:
            return max(timed(fn) - dispatch, 0.0) * steps

        inputs = batch_x
        for index, layer in enumerate(model.layers):
            layer_input = tf.cast(inputs, layer.compute_dtype) if layer.compute_dtype else inputs

            @tf.function
            def forward_backward(t=layer_input, layer=layer, first=index == 0):
                with tf.GradientTape() as tape:
                    tape.watch(t)
                    out = layer(t, training=True)
                    total = tf.reduce_sum(tf.cast(out, tf.float32))
                # training needs no gradient for the images themselves, only for every later layer's input
                return tape.gradient(total, layer.trainable_variables if first else [t, *layer.trainable_variables])

            rows.append((f"{layer.name} ({type(layer).__name__}) forward + backward", per_epoch(forward_backward)))
            inputs = layer(layer_input, training=False)

        loss_fn = keras.losses.SparseCategoricalCrossentropy()
        probabilities = tf.cast(inputs, tf.float32)

        @tf.function
        def loss_and_metric():
            with tf.GradientTape() as tape:
                tape.watch(probabilities)
                loss = loss_fn(batch_y, probabilities)
            return tape.gradient(loss, probabilities), tf.reduce_mean(
                tf.cast(tf.argmax(probabilities, axis=1) == tf.cast(batch_y, tf.int64), tf.float32)
            )

        rows.append(("loss + accuracy (and its gradient)", per_epoch(loss_and_metric)))
        gradients = [tf.zeros_like(v) for v in model.trainable_variables]

        @tf.function
        def optimizer_step():
            model.optimizer.apply(gradients, model.trainable_variables)

        rows.append(("optimizer: Adam + moving average of the weights", per_epoch(optimizer_step)))
        data = batches()
        for _ in data:  # a first pass: the staged file in the page cache
            pass
        started = time.perf_counter()
        for _ in data:
            pass
        rows.append(("input pipeline alone (overlaps the step: prefetched)", time.perf_counter() - started))

    accounted = sum(s for name, s in rows if not name.startswith("input"))
    print(
        f"One epoch of the seed network on {device}, {policy}, batch {BATCH}, {steps} steps, {os.cpu_count()} cores; "
        f"calling a compiled function: {dispatch * 1e6:.0f} µs\n"
    )
    print("| part | seconds per epoch | share of the epoch |\n|---|---|---|")
    for name, s in rows:
        print(f"| {name} | {s:.2f} | {100 * s / epoch:.0f} % |")
    print(
        f"| everything else: Keras' loop, Python, TensorFlow's dispatch | {epoch - accounted:.2f} | {100 * (epoch - accounted) / epoch:.0f} % |"
    )
    print(f"| **whole epoch (model.fit, median of epochs 2–3)** | **{epoch:.2f}** | 100 % |")
    if args.record:
        record = {
            **measured,
            "device": device,
            "dtype_policy": policy,
            "batch_size": BATCH,
            "steps_per_epoch": steps,
            "dispatch_us": round(dispatch * 1e6),
            "epoch_seconds": round(epoch, 3),
            "parts": [{"part": name, "seconds_per_epoch": round(s, 3)} for name, s in rows],
            "unexplained_seconds_per_epoch": round(epoch - accounted, 3),
        }
        out = write_record("profile.json", record)
        print(f"recorded in {out.relative_to(REPO)}", file=sys.stderr)


if __name__ == "__main__":
    main()

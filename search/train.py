"""Retrain the winning configuration on the whole training split, for longer than any trial."""

from __future__ import annotations

from typing import Callable

import keras
import keras_tuner as kt

from search.data import Split


def train_final(
    hypermodel: kt.HyperModel,
    hyperparameters: kt.HyperParameters,
    train: Split,
    validation: Split,
    epochs: int,
    batch_size: int,
    patience: int,
    on_epoch_end: Callable[[int, dict], None],
) -> keras.Model:
    """A fresh model of the best configuration, trained up to `epochs` epochs.

    It keeps the weights of its best validation epoch (early stopping with
    `patience`, restoring the best weights); `on_epoch_end(epoch, logs)` sees
    every epoch, for tracking.
    """
    model = hypermodel.build(hyperparameters.copy())
    callbacks = [keras.callbacks.LambdaCallback(on_epoch_end=on_epoch_end)]
    if patience:
        callbacks.append(keras.callbacks.EarlyStopping(monitor="val_accuracy", mode="max", patience=patience, restore_best_weights=True))
    model.fit(train.x, train.y, validation_data=(validation.x, validation.y), epochs=epochs, batch_size=batch_size, callbacks=callbacks, verbose=2)
    return model

"""Trials one at a time in this process, in Keras Tuner's own search loop (the tuner's hooks
drive each trial's lifecycle, search/trial.py)."""

from __future__ import annotations

import keras_tuner as kt

from experiments import SearchConfig
from search.data import Split
from search.robustness import heldout_probe
from search.train import evaluation_dataset, training_dataset
from search.trial import trial_callbacks


class InProcess:
    """Keras Tuner's search loop: trials train one at a time on `train` (from memory, via tf.data)."""

    def __init__(self, config: SearchConfig, verbose: int = 0):
        self.config, self.verbose = config, verbose

    def run(self, tuner: kt.Tuner, train: Split, validation: Split) -> None:
        tuner.search(
            training_dataset(train, self.config.batch_size, self.config.seed),
            validation_data=evaluation_dataset(validation, self.config.batch_size),
            epochs=self.config.max_epochs,
            callbacks=trial_callbacks(self.config, heldout_probe(validation, self.config.seed)),
            shuffle=False,  # the dataset shuffles
            verbose=self.verbose,
        )

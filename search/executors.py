"""Where trials run: one at a time in this process, in Keras Tuner's own search loop, or as
Ray tasks, many at once (search/scaleout.py). Either way each trial goes through the same
lifecycle (search/trial.py) and is booked by the tuner; a search does not know which runs it."""

from __future__ import annotations

from typing import Protocol

import keras_tuner as kt

from experiments import SearchConfig
from search.data import Split
from search.robustness import heldout_probe
from search.train import evaluation_dataset, training_dataset
from search.tuner import trial_callbacks


class Executor(Protocol):
    def run(self, tuner: kt.Tuner, train: Split, validation: Split) -> None:
        """Every trial the tuner's oracle hands out, trained on `train`, scored on `validation`."""


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


def executor_for(config: SearchConfig, verbose: int = 0) -> Executor:
    """Ray's where `config.ray` names a cluster (checked now: one that does not answer is a
    ClusterError), else this process."""
    if config.ray:
        from search.scaleout import RayTrials  # Ray loads only when it is used

        return RayTrials(config)
    return InProcess(config, verbose)

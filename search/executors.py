"""Where trials run: one at a time in this process, in Keras Tuner's own search loop
(search/in_process.py), or as Ray tasks, many at once (search/scaleout.py). Either way each
trial goes through the same lifecycle (search/trial.py) and is booked by the tuner; a search
does not know which runs it."""

from __future__ import annotations

from typing import Protocol

import keras_tuner as kt

from experiments import SearchConfig
from search.data import Split


class Executor(Protocol):
    def run(self, tuner: kt.Tuner, train: Split, validation: Split) -> None:
        """Every trial the tuner's oracle hands out, trained on `train`, scored on `validation`."""


def executor_for(config: SearchConfig, verbose: int = 0) -> Executor:
    """Ray's where `config.ray` names a cluster (checked now: one that does not answer is a
    ClusterError), else this process."""
    if config.ray:
        from search.scaleout import RayTrials  # Ray loads only when it is used

        return RayTrials(config)
    from search.in_process import InProcess

    return InProcess(config, verbose)

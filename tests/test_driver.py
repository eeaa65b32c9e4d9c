"""The driver's one loop (search/driver.py): checkpoints where Keras Tuner loads them. The loop
itself runs in every search of the end-to-end and fault tests, on both backends."""

from __future__ import annotations

import keras_tuner as kt
import numpy as np

from experiments import resolve
from model_zoo import PlainCNN
from search.driver import save_checkpoint
from search.tuner import make_tuner


def test_a_trial_checkpoint_is_where_keras_tuner_loads_it_also_for_hyperbands_next_round(tmp_path):
    config = resolve("smoke", tuner="hyperband", max_epochs=3, hyperband_factor=3)
    tuner = make_tuner(config, None, tmp_path, "tuner", hypermodel=PlainCNN())
    trial = tuner.oracle.create_trial("ray-0")
    model = tuner.hypermodel.build(trial.hyperparameters.copy())
    weights = [np.full(w.shape, 0.5, w.dtype) for w in model.get_weights()]
    save_checkpoint(tuner, trial, weights)
    assert all(np.array_equal(a, b) for a, b in zip(tuner.load_model(trial).get_weights(), weights))
    # A next round's trial names the one it continues; Keras Tuner builds it from that one's files.
    later = kt.engine.trial.Trial(trial.hyperparameters.copy(), trial_id="9")
    later.hyperparameters.values["tuner/trial_id"] = trial.trial_id
    save_checkpoint(tuner, later, [w * 2 for w in weights])
    assert all(np.array_equal(a, 2 * b) for a, b in zip(tuner.load_model(later).get_weights(), weights))

"""Model tests of retraining the winning configuration."""

import keras_tuner as kt
import numpy as np

from model_zoo import PlainCNN
from search.data import Split
from search.train import train_final


def test_train_final_reports_every_epoch_and_keeps_a_working_model():
    rng = np.random.default_rng(0)
    x = rng.random((256, 28, 28, 1), dtype=np.float32)
    y = np.arange(256) % 10
    hp = kt.HyperParameters()
    hp.Fixed("conv_filters_0", 8)
    seen = []
    model = train_final(PlainCNN(), hp, Split(x, y), Split(x[:64], y[:64]), epochs=3, batch_size=64, patience=0, on_epoch_end=lambda epoch, logs: seen.append((epoch, sorted(logs))))
    assert [epoch for epoch, _ in seen] == [0, 1, 2]
    assert seen[0][1] == ["accuracy", "loss", "val_accuracy", "val_loss"]
    assert model.predict(x[:5], verbose=0).shape == (5, 10)

"""Model tests: every hypermodel builds from empty HyperParameters with the documented defaults."""

import keras_tuner as kt
import numpy as np
import pytest

from model_zoo import FAMILIES, BatchNormCNN, CNNZoo, PlainCNN, average_of, make_cnn

SHARED_DEFAULTS = {
    "conv_blocks": 2,
    "conv_filters_0": 32,
    "conv_filters_1": 64,
    "dropout": 0.5,
    "dense_units": 0,
    "learning_rate": 1e-3,
}


def active(hp):
    return {name: value for name, value in hp.values.items() if hp.is_active(name)}


@pytest.mark.parametrize(
    "hypermodel, extra",
    [
        (PlainCNN(), {"kernel_size": 3}),
        (BatchNormCNN(), {"convs_per_block": 2}),
        (CNNZoo(), {"family": "plain", "kernel_size": 3}),
        (CNNZoo(("batchnorm", "plain")), {"family": "batchnorm", "convs_per_block": 2}),
    ],
    ids=["plain", "batchnorm", "zoo", "zoo-batchnorm-first"],
)
def test_builds_from_empty_hyperparameters_with_defaults(hypermodel, extra):
    hp = kt.HyperParameters()
    model = hypermodel.build(hp)
    assert active(hp) == {**SHARED_DEFAULTS, **extra}
    assert model.output_shape == (None, 10)
    probabilities = model.predict(np.zeros((2, 28, 28, 1), np.float32), verbose=0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_space_covers_architecture_not_just_learning_rate():
    hp = kt.HyperParameters()
    CNNZoo().build(hp)
    names = {p.name for p in hp.space}
    # Both families' own choices are in the space from the first build.
    assert {"family", "conv_blocks", "conv_filters_0", "kernel_size", "convs_per_block", "dropout", "dense_units", "learning_rate"} <= names
    assert hp.get("learning_rate") == 1e-3
    assert [p for p in hp.space if p.name == "learning_rate"][0].sampling == "log"


def test_plain_family_has_no_batch_norm_and_batchnorm_family_does():
    def layer_types(model):
        return {type(layer).__name__ for layer in model.layers}

    assert "BatchNormalization" not in layer_types(PlainCNN().build(kt.HyperParameters()))
    assert "BatchNormalization" in layer_types(BatchNormCNN().build(kt.HyperParameters()))


def test_filters_of_blocks_that_do_not_exist_are_inactive():
    hp = kt.HyperParameters()
    hp.Fixed("conv_blocks", 1)
    PlainCNN().build(hp)
    assert "conv_filters_1" not in active(hp)


@pytest.mark.parametrize("seed", range(6))
def test_random_points_of_the_space_build_valid_models(seed):
    zoo = CNNZoo(tuple(FAMILIES))
    space = kt.HyperParameters()
    zoo.build(space)
    oracle_hp = space.copy()
    rng = np.random.default_rng(seed)
    for p in oracle_hp.space:
        oracle_hp.values[p.name] = p.random_sample(int(rng.integers(1 << 30)))
    model = zoo.build(oracle_hp)
    assert model.output_shape == (None, 10)


def test_make_cnn_defaults_follow_mnist_convnet():
    model = make_cnn()
    convs = [layer for layer in model.layers if type(layer).__name__ == "Conv2D"]
    assert [c.filters for c in convs] == [32, 64]
    assert model.layers[-1].dtype_policy.compute_dtype == "float32"


def test_an_average_of_models_is_one_model_that_saves_and_serves(tmp_path):
    import keras

    from search.pyfunc_model import DigitClassifier

    members = [make_cnn(conv_filters=(4,), batch_norm=True, dense_units=8) for _ in range(2)]
    assert average_of(members[:1]) is members[0]
    ensemble = average_of(members)
    digits = np.random.default_rng(0).random((16, 28, 28, 1), dtype=np.float32)
    expected = (members[0].predict(digits, verbose=0) + members[1].predict(digits, verbose=0)) / 2
    np.testing.assert_allclose(ensemble.predict(digits, verbose=0), expected, atol=1e-6)
    ensemble.save(tmp_path / "ensemble.keras")
    loaded = keras.saving.load_model(tmp_path / "ensemble.keras", safe_mode=True)
    np.testing.assert_allclose(loaded.predict(digits, verbose=0), expected, atol=1e-6)
    for served in (DigitClassifier.float32(loaded), DigitClassifier.int8(loaded)):
        np.testing.assert_allclose(served.predict(digits)["probabilities"], expected, atol=0.02)

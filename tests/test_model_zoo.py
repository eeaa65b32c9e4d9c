"""Model tests: every hypermodel builds from empty HyperParameters with the documented defaults."""

import keras_tuner as kt
import numpy as np
import pytest

from model_zoo import (
    FAMILIES,
    BatchNormCNN,
    CNNZoo,
    FusedBatchNormalization,
    PlainCNN,
    ResidualCNN,
    ZooHyperModel,
    average_of,
    make_cnn,
    with_keras_layers,
)

SHARED_DEFAULTS = {
    "conv_blocks": 2,
    "conv_filters_0": 32,
    "conv_filters_1": 64,
    "kernel_size": 3,
    "head": "flatten",
    "input_norm": "standardize",
    "dropout": 0.5,
    "dense_units": 0,
    "learning_rate": 1e-3,
}


SHARED_DEFAULTS_CONVS_PER_BLOCK = 2  # convs_per_block's default, for the families that draw it


def active(hp):
    return {name: value for name, value in hp.values.items() if hp.is_active(name)}


@pytest.mark.parametrize(
    "hypermodel, extra",
    [
        (PlainCNN(), {}),
        (BatchNormCNN(), {"convs_per_block": 2}),
        (ResidualCNN(), {"convs_per_block": 2}),
        (CNNZoo(), {"family": "plain"}),
        (CNNZoo(("batchnorm", "plain")), {"family": "batchnorm", "convs_per_block": 2}),
        (CNNZoo(("residual",)), {"family": "residual", "convs_per_block": 2}),
    ],
    ids=["plain", "batchnorm", "residual", "zoo", "zoo-batchnorm-first", "zoo-residual"],
)
def test_builds_from_empty_hyperparameters_with_defaults(hypermodel, extra):
    hp = kt.HyperParameters()
    model = hypermodel.build(hp)
    assert active(hp) == {**SHARED_DEFAULTS, **extra}
    assert model.output_shape == (None, 10)
    probabilities = model.predict(np.zeros((2, 28, 28, 1), np.float32), verbose=0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_of_the_table_builds_its_layout_from_empty_hyperparameters(family):
    import keras

    model = ZooHyperModel(family=family).build(kt.HyperParameters())
    layers = [type(layer) for layer in model.layers]
    # 1x1 convolutions are the residual family's projections of its skip connections.
    convolutions = sum(isinstance(layer, keras.layers.Conv2D) and layer.kernel_size != (1, 1) for layer in model.layers)
    expected = FAMILIES[family].layout(SHARED_DEFAULTS_CONVS_PER_BLOCK)["convs_per_block"] * SHARED_DEFAULTS["conv_blocks"]
    assert convolutions == expected
    assert (FusedBatchNormalization in layers or keras.layers.BatchNormalization in layers) == FAMILIES[family].batch_norm
    assert (keras.layers.Add in layers) == FAMILIES[family].residual
    assert model.output_shape == (None, 10)


def test_space_covers_architecture_not_just_learning_rate():
    hp = kt.HyperParameters()
    CNNZoo().build(hp)
    names = {p.name for p in hp.space}
    # Both families' own choices are in the space from the first build.
    assert {
        "family",
        "conv_blocks",
        "conv_filters_0",
        "kernel_size",
        "head",
        "convs_per_block",
        "dropout",
        "dense_units",
        "learning_rate",
    } <= names
    assert [p for p in hp.space if p.name == "family"][0].values == list(FAMILIES)
    assert hp.get("learning_rate") == 1e-3
    assert [p for p in hp.space if p.name == "learning_rate"][0].sampling == "log"


def test_plain_family_has_no_batch_norm_and_batchnorm_family_does():
    import keras

    def has_batch_norm(model):
        return any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)

    assert not has_batch_norm(PlainCNN().build(kt.HyperParameters()))
    assert has_batch_norm(BatchNormCNN().build(kt.HyperParameters()))


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


def test_an_average_of_models_is_one_model_that_saves_and_serves(tmp_path, dtype_policy):
    import keras

    from search.assessment import int8_tflite
    from search.serving.pyfunc_model import DigitClassifier

    members = [make_cnn(conv_filters=(4,), batch_norm=True, dense_units=8) for _ in range(2)]
    assert average_of(members[:1]) is members[0]
    ensemble = average_of(members)
    digits = np.random.default_rng(0).random((16, 28, 28, 1), dtype=np.float32)
    expected = (members[0].predict(digits, verbose=0) + members[1].predict(digits, verbose=0)) / 2
    assert ensemble.output.dtype == "float32"  # not the mean rounded to bf16
    # Under mixed precision a member called inside the ensemble gets the digits rounded to
    # bf16 before its float32 standardisation: the same answers, not the same last bits.
    atol = 1e-6 if dtype_policy == "float32" else 5e-3
    np.testing.assert_allclose(ensemble.predict(digits, verbose=0), expected, atol=atol)
    with_keras_layers(ensemble).save(tmp_path / "ensemble.keras")
    loaded = keras.saving.load_model(tmp_path / "ensemble.keras", safe_mode=True)
    np.testing.assert_allclose(loaded.predict(digits, verbose=0), expected, atol=atol)
    for classifier in (DigitClassifier.float32(loaded), DigitClassifier.from_tflite(int8_tflite(loaded))):
        np.testing.assert_allclose(classifier.probabilities(digits), expected, atol=0.02)


def test_fused_batch_norm_trains_exactly_as_keras_batch_norm(dtype_policy):
    import keras
    import tensorflow as tf

    # Both layers normalise in float32; under bf16 the output is rounded to 8 bits of
    # mantissa (one step at |y| = 4 is 0.03), and so is the gradient flowing back.
    atol, gradient_atol = (1e-5, 1e-4) if dtype_policy == "float32" else (0.04, 4e-3)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(2.0, 3.0, (16, 7, 7, 5)).astype(np.float32))
    upstream = tf.constant(rng.normal(size=(16, 7, 7, 5)).astype(np.float32))
    weights = [rng.normal(1.0, 0.2, 5), rng.normal(0.0, 0.2, 5), rng.normal(0.0, 0.1, 5), rng.uniform(0.5, 2.0, 5)]
    results = []
    for layer in (keras.layers.BatchNormalization(momentum=0.9), FusedBatchNormalization(momentum=0.9)):
        layer.build(x.shape)
        layer.set_weights([w.astype(np.float32) for w in weights])
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(tf.cast(y, "float32") * upstream)
        gradients = tape.gradient(loss, [x, *layer.trainable_weights])
        results.append((y, gradients, layer.get_weights()[2:], layer(x, training=False)))
    (keras_y, keras_grads, keras_moving, keras_inference), (fused_y, fused_grads, fused_moving, fused_inference) = results
    assert fused_y.dtype == keras_y.dtype == layer.compute_dtype
    np.testing.assert_allclose(np.float32(fused_y), np.float32(keras_y), atol=atol)
    for fused, expected in zip(fused_grads, keras_grads):
        np.testing.assert_allclose(np.float32(fused), np.float32(expected), rtol=1e-4, atol=gradient_atol)
    # The moving variance averages the biased batch variance, as Keras' layer does
    # (the unbiased one would be 0.13% larger here: 784 values per channel).
    for fused, expected in zip(fused_moving, keras_moving):
        np.testing.assert_allclose(fused, expected, rtol=1e-5)
    assert not np.allclose(keras_moving[0], weights[2])  # the step did move them
    np.testing.assert_allclose(np.float32(fused_inference), np.float32(keras_inference), atol=atol)


@pytest.mark.e2e  # a fresh Python process, where this project cannot be imported
def test_a_model_saved_with_keras_layers_loads_without_this_project(tmp_path, dtype_policy):
    import subprocess
    import sys

    model = average_of([make_cnn(conv_filters=(4,), convs_per_block=2, batch_norm=True) for _ in range(2)])
    digits = np.random.default_rng(1).random((4, 28, 28, 1), dtype=np.float32)
    saved = with_keras_layers(model)
    assert not [layer for layer in saved._flatten_layers() if isinstance(layer, FusedBatchNormalization)]
    assert sum(type(layer).__name__ == "BatchNormalization" for layer in saved._flatten_layers()) == 4
    np.testing.assert_array_equal(saved.predict(digits, verbose=0), model.predict(digits, verbose=0))
    saved.save(tmp_path / "model.keras")
    np.save(tmp_path / "digits.npy", digits)
    np.save(tmp_path / "expected.npy", model.predict(digits, verbose=0))
    # A fresh interpreter in another folder: model_zoo cannot be imported there.
    check = (
        "import keras, numpy as np; m = keras.saving.load_model('model.keras');"
        "np.testing.assert_allclose(m.predict(np.load('digits.npy'), verbose=0), np.load('expected.npy'), atol=1e-6)"
    )
    done = subprocess.run(
        [sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True, env={"PATH": "", "TF_CPP_MIN_LOG_LEVEL": "3"}
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_with_keras_layers_keeps_the_compiled_loss_and_optimizer():
    model = make_cnn(conv_filters=(4,), batch_norm=True, learning_rate=0.005)
    saved = with_keras_layers(model)
    assert saved is not model and saved.compiled
    assert saved.get_compile_config() == model.get_compile_config()
    plain = make_cnn(conv_filters=(4,))
    assert with_keras_layers(plain) is plain  # nothing to replace


def test_a_hypermodel_builds_under_its_own_policy_whatever_keras_tuner_resets():
    """Keras Tuner calls keras.backend.clear_session() before every build, which
    resets Keras' global policy to float32: the search's policy must reach the model anyway."""
    import keras

    for hypermodel in (CNNZoo(("batchnorm",), dtype_policy="mixed_bfloat16"), PlainCNN(dtype_policy="mixed_bfloat16")):
        keras.backend.clear_session()
        model = hypermodel.build(kt.HyperParameters())
        # The input's standardisation computes in float32, as the softmax does.
        standardized = [layer.name for layer in model.layers].index("light_on_dark")
        assert {layer.dtype_policy.name for layer in model.layers[1 : standardized + 1]} == {"float32"}
        assert {layer.dtype_policy.name for layer in model.layers[standardized + 1 : -1]} == {"mixed_bfloat16"}
        assert model.output.dtype == "float32"  # the softmax stays float32
        assert keras.mixed_precision.global_policy().name == "float32"
    assert {layer.dtype_policy.name for layer in CNNZoo().build(kt.HyperParameters()).layers} == {"float32"}


def test_residual_blocks_add_their_input_and_project_it_where_the_filters_change():
    import keras

    model = make_cnn(conv_filters=(16, 16), convs_per_block=2, residual=True)
    adds = [layer for layer in model.layers if isinstance(layer, keras.layers.Add)]
    assert len(adds) == 2
    # Block 1 goes from 1 channel to 16: a 1x1 projection; block 2 keeps 16: the identity.
    projections = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D) and layer.kernel_size == (1, 1)]
    assert len(projections) == 1
    assert sum(isinstance(layer, FusedBatchNormalization) for layer in model.layers) == 5  # batch norm implied
    digits = np.random.default_rng(0).random((8, 28, 28, 1), dtype=np.float32)
    model.fit(digits, np.arange(8), epochs=1, verbose=0)
    assert model.predict(digits, verbose=0).shape == (8, 10)


def test_the_head_is_flatten_or_global_average_pooling():
    import keras

    flatten, gap = make_cnn(conv_filters=(8,)), make_cnn(conv_filters=(8,), head="gap")
    assert any(isinstance(layer, keras.layers.GlobalAveragePooling2D) for layer in gap.layers)
    assert not any(isinstance(layer, keras.layers.Flatten) for layer in gap.layers)
    assert gap.count_params() < flatten.count_params()  # 8 features into the softmax, not 14 x 14 x 8
    with pytest.raises(ValueError, match="unknown head 'dense'"):
        make_cnn(head="dense")


def test_standardized_input_makes_contrast_background_and_polarity_not_matter(mnist):
    """The same digits faint, on grey, and dark on white give the network the same input,
    and so the same answer; without it they do not."""
    import keras

    digits = mnist.test.x[:32]
    standardized = make_cnn(conv_filters=(8,))
    raw = make_cnn(conv_filters=(8,), input_norm="none")
    first = keras.Model(standardized.input, standardized.get_layer("light_on_dark").output)
    reference = first.predict(digits, verbose=0)
    np.testing.assert_allclose(reference.mean(axis=(1, 2, 3)), 0.0, atol=1e-4)
    for changed in (0.35 * digits, 0.6 * digits + 0.35, 1.0 - digits):
        np.testing.assert_allclose(first.predict(changed, verbose=0), reference, atol=2e-3)
        np.testing.assert_allclose(standardized.predict(changed, verbose=0), standardized.predict(digits, verbose=0), atol=1e-4)
        assert not np.allclose(raw.predict(changed, verbose=0), raw.predict(digits, verbose=0), atol=1e-3)
    with pytest.raises(ValueError, match="unknown input_norm 'zca': choose one of none, standardize"):
        make_cnn(input_norm="zca")

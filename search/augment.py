"""Augmentation of the final training's digits, inside the tf.data pipeline.

`jitter`: small random shifts, rotations and zooms (Keras' preprocessing layers).
`pixels`: `robust` without its affine move.
`gentle`: `pixels` after a gentle affine move of every image (the near end of `robust`'s).
`robust`: the suite's trained-on kinds of change (search/robustness.py) at random
severities, from none to beyond the suite's, so that the model learns the kinds
rather than the suite's exact digits: each image is moved by a random affine map
(half of them gently, half as far as a careless scan does), then gets one of the
changes of its pixels in CHANGES, or none. `IMITATES` says which kinds of the
suite each change imitates: only kinds the suite lets training imitate, never a
held-out one (tests/test_augment.py reads both tables). `leave_out` drops the
changes of whole families: the benchmark's leave-one-family-out estimate.
Never applied to validation or test digits.
"""

from __future__ import annotations

import math
from typing import Callable

import keras
import tensorflow as tf

from experiments import AUGMENTATIONS
from search.robustness import KINDS

# jitter: shifts of up to 8% (2.2 px), rotations of up to 0.025 turn (9
# degrees), zooms of up to 8%; stronger jitter costs clean accuracy in short trainings.
SHIFT, ROTATION, ZOOM = 0.08, 0.025, 0.08

# robust, geometry: the far end of each range; a gentle image gets GENTLE of it.
FAR_ROTATION = math.radians(25)  # the suite rotates by 20 degrees
FAR_SHEAR = 0.35  # the suite's: 0.3
FAR_LOG_SCALE = (math.log(0.65), math.log(1.25))  # the suite's: 0.7 and 1.2
FAR_SHIFT_PX = 4.5  # the suite's: 4 px
GENTLE = 0.35
# The share of moved images moved as far as the far end: robust moves half of them so,
# gentle none (a nudge of up to 9 degrees and 1.6 px, as a careful scan varies).
FAR_SHARE = {"robust": 0.5, "gentle": 0.0}
# robust, pixels: the share of images left unchanged; the rest get one of CHANGES.
UNCHANGED = 0.3
# What each change imitates: kinds of the suite (search/robustness.py's KINDS). The
# affine move (`move`) is applied to every image before one of the pixel changes.
IMITATES = {
    "move": ("rotation", "shear", "scale", "translation"),
    "noise": ("gaussian_noise",),
    "impulse": ("impulse_noise",),
    "dilate": ("thick_strokes",),
    "occlude": ("occlusion",),
    "line": ("line",),
}
CHANGES = tuple(name for name in IMITATES if name != "move")


def augmenter(kind: str, seed: int, leave_out: tuple[str, ...] = ()) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor] | None:
    """(batch, stateless seed of shape (2,)) -> augmented batch; None for `none`. `leave_out`:
    families of the suite whose imitations `robust` leaves out."""
    if kind not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {kind!r}: choose one of {', '.join(AUGMENTATIONS)}")
    if kind == "none":
        return None
    if kind == "jitter":
        layers = jitter(seed)
        return lambda x, _: layers(x, training=True)
    kept, far = kept_changes(kind, leave_out), FAR_SHARE.get(kind, 0.0)
    return robust if kept == tuple(IMITATES) and kind == "robust" else lambda x, s: robust(x, s, kept, far)


def kept_changes(kind: str, leave_out: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The changes of IMITATES that augmentation `kind` makes, less those imitating the families in `leave_out`."""
    if kind not in ("robust", "gentle", "pixels"):
        return ()
    leave_out = (*leave_out, "geometry") if kind == "pixels" else leave_out
    return tuple(change for change in IMITATES if not {KINDS[k].family for k in IMITATES[change]} & set(leave_out))


def jitter(seed: int) -> keras.Sequential:
    """Random shifts, rotations and zooms; digits stay on a black background."""
    layers = keras.layers
    return keras.Sequential(
        [
            layers.RandomTranslation(SHIFT, SHIFT, fill_mode="constant", seed=seed),
            layers.RandomRotation(ROTATION, fill_mode="constant", seed=seed + 1),
            layers.RandomZoom(ZOOM, fill_mode="constant", seed=seed + 2),
        ],
        name="augmentation",
    )


def robust(x: tf.Tensor, seed: tf.Tensor, changes: tuple[str, ...] = tuple(IMITATES), far_share: float = FAR_SHARE["robust"]) -> tf.Tensor:
    """A batch (B, 28, 28, 1) in [0, 1] moved (`far_share` of the images as far as the far
    end, the rest gently) and changed per image (by `changes` of IMITATES only); deterministic in `seed`."""
    move, change = tf.unstack(tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 2))
    moved = _move(x, move, far_share) if "move" in changes else x
    return tf.clip_by_value(_change_pixels(moved, change, [c for c in CHANGES if c in changes]), 0.0, 1.0)


def _uniform(seed: tf.Tensor, batch: tf.Tensor, low: float = 0.0, high: float = 1.0, shape: tuple = ()) -> tf.Tensor:
    return tf.random.stateless_uniform(tf.concat([[batch], tf.constant(shape, tf.int32)], 0), seed, low, high)


def _move(x: tf.Tensor, seed: tf.Tensor, far_share: float) -> tf.Tensor:
    """One random affine map per image: rotation, shear, scale and shift, `far_share` of them far, the rest gentle."""
    b = tf.shape(x)[0]
    s = tf.random.experimental.stateless_split(seed, 6)
    reach = tf.where(_uniform(s[0], b) < 1.0 - far_share, GENTLE, 1.0)
    angle = _uniform(s[1], b, -1, 1) * FAR_ROTATION * reach
    shear = _uniform(s[2], b, -1, 1) * FAR_SHEAR * reach
    zoom = tf.exp(_uniform(s[3], b, *FAR_LOG_SCALE) * reach)
    shift = _uniform(s[4], b, -1, 1, (2,)) * FAR_SHIFT_PX * reach[:, None]
    # Output pixel p samples the input at M (p - c) + c - shift, M = rotation @ shear / zoom.
    cos, sin = tf.cos(angle), tf.sin(angle)
    m00, m01 = cos / zoom, (cos * shear - sin) / zoom
    m10, m11 = sin / zoom, (sin * shear + cos) / zoom
    return _resample(x, m00, m01, m10, m11, shift[:, 0], shift[:, 1])


def _resample(x, m00, m01, m10, m11, dx, dy) -> tf.Tensor:
    c = 13.5
    ones = tf.ones_like(m00)
    transforms = tf.stack([m00, m01, c - m00 * c - m01 * c - dx, m10, m11, c - m10 * c - m11 * c - dy, 0 * ones, 0 * ones], 1)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=x, transforms=transforms, output_shape=[28, 28], fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT"
    )


def _change_pixels(x: tf.Tensor, seed: tf.Tensor, changes: list[str]) -> tf.Tensor:
    """Each image unchanged (UNCHANGED of them) or given one of `changes` at a random severity."""
    if not changes:
        return x
    b = tf.shape(x)[0]
    seeds = iter(tf.unstack(tf.random.experimental.stateless_split(seed, 16)))
    per_image = lambda low=0.0, high=1.0, shape=(): _uniform(next(seeds), b, low, high, shape)  # noqa: E731
    column = lambda v: tf.reshape(v, [-1, 1, 1, 1])  # noqa: E731
    rows, cols = tf.range(28, dtype=tf.float32)[None, :, None, None], tf.range(28, dtype=tf.float32)[None, None, :, None]

    def noise():
        return x + tf.random.stateless_normal(tf.shape(x), next(seeds)) * column(per_image(0.0, 0.3))

    def impulse():
        hit = tf.random.stateless_uniform(tf.shape(x), next(seeds)) < column(per_image(0.0, 0.15))
        return tf.where(hit, tf.round(tf.random.stateless_uniform(tf.shape(x), next(seeds))), x)

    def dilate():
        return _blend(x, tf.nn.max_pool2d(x, 3, 1, "SAME"), column(per_image(0.2, 1.0)))

    def occlude():
        corner, extent = per_image(2.0, 22.0, (2,)), per_image(4.0, 10.0, (2,))
        r0, c0, h, w = (column(v) for v in (corner[:, 0], corner[:, 1], extent[:, 0], extent[:, 1]))
        return tf.where((rows >= r0) & (rows < r0 + h) & (cols >= c0) & (cols < c0 + w), 0.0, x)

    def line():
        angle, through, width = per_image(0.0, math.pi), per_image(7.5, 19.5, (2,)), per_image(1.0, 2.5)
        distance = tf.abs((rows - column(through[:, 0])) * column(tf.cos(angle)) - (cols - column(through[:, 1])) * column(tf.sin(angle)))
        return tf.maximum(x, tf.clip_by_value(column(width) / 2 + 0.5 - distance, 0.0, 1.0) * column(per_image(0.6, 1.0)))

    made = {"noise": noise, "impulse": impulse, "dilate": dilate, "occlude": occlude, "line": line}
    options = tf.stack([x] + [made[name]() for name in changes], 1)
    change = 1 + tf.minimum(tf.cast(per_image() * len(changes), tf.int32), len(changes) - 1)
    pick = tf.where(per_image() < UNCHANGED, 0, change)
    return tf.gather(options, pick, batch_dims=1)


def _blend(a: tf.Tensor, b: tf.Tensor, weight: tf.Tensor) -> tf.Tensor:
    return a + (b - a) * weight

"""Data tests of the augmentation against the robustness suite: no augmentation names or
imitates a held-out kind of change, read from the suite's one table (search/robustness.py)."""

import numpy as np
import pytest

from search import augment, robustness


def test_every_change_imitates_only_kinds_the_suite_lets_training_imitate():
    imitated = [kind for kinds in augment.IMITATES.values() for kind in kinds]
    assert set(imitated) <= set(robustness.KINDS), "an augmentation names a kind the suite does not have"
    held = [kind for kind in imitated if not robustness.KINDS[kind].trained]
    assert not held, f"augmentations imitate held-out kinds {held}"
    assert set(augment.CHANGES) | {"move"} == set(augment.IMITATES)


def test_no_change_is_named_after_a_held_out_kind_or_its_family():
    """A change named like a held-out kind (or a family held out whole) imitates it, whatever it declares."""
    whole = {f for f in robustness.FAMILIES if not any(k.trained for k in robustness.KINDS.values() if k.family == f)}
    for change in augment.IMITATES:
        for kind in robustness.HELD_OUT:
            assert kind not in change, (change, kind)
        assert change not in whole, change


@pytest.mark.parametrize("kind", robustness.HELD_OUT)
def test_the_augmented_digits_are_no_nearer_a_held_out_kind_than_the_clean_digits_are(mnist, kind):
    """Behaviour, not names: over many augmented draws of the same digits, the nearest draw
    to each held-out kind's digits is no nearer to them than the clean digit is, give or take
    what any random change of the digit does. An augmentation that imitated the kind would
    land near it."""
    clean = mnist.train.x[:64]
    # The pixel changes alone, and the move alone: either, imitating the kind, would land near it.
    pixels, move = augment.CHANGES, ("move",)
    draws = np.stack([augment.robust(clean, np.array([seed, 1], np.int64), part).numpy() for seed in range(16) for part in (pixels, move)])
    changed = robustness.corrupt(robustness.Split(clean, mnist.train.y[:64]), kind, seed=0).x
    nearest = np.abs(draws - changed[None]).mean(axis=(2, 3, 4)).min(axis=0)
    from_clean = np.abs(clean - changed).mean(axis=(1, 2, 3))
    ratio = float(np.median(nearest / np.maximum(from_clean, 1e-6)))
    print(f"{kind}: {ratio:.2f}")
    assert ratio > 0.5, f"augmentation lands near {kind}: {ratio:.2f} of the clean digits' distance"


def test_leaving_families_out_drops_their_changes(mnist):
    digits, seed = mnist.train.x[:32], np.array([1, 2], np.int64)
    assert augment.augmenter("robust", 0) is augment.robust
    nothing_left = augment.augmenter("robust", 0, leave_out=robustness.FAMILIES)
    np.testing.assert_array_equal(nothing_left(digits, seed).numpy(), digits)
    only_geometry = augment.augmenter("robust", 0, leave_out=tuple(f for f in robustness.FAMILIES if f != "geometry"))
    np.testing.assert_array_equal(only_geometry(digits, seed).numpy(), augment.robust(digits, seed, ("move",)).numpy())


def _centres(digits: np.ndarray) -> np.ndarray:
    """Each digit's centre of ink (row, column)."""
    ink = digits[..., 0]
    grid = np.arange(28, dtype=np.float32)
    total = ink.sum(axis=(1, 2))
    return np.stack([(ink.sum(axis=2) * grid).sum(axis=1) / total, (ink.sum(axis=1) * grid).sum(axis=1) / total], axis=1)


def test_gentle_moves_every_digit_but_never_as_far_as_robust_moves_some(mnist):
    digits = mnist.train.x[:256]
    seeds = [np.array([seed, 3], np.int64) for seed in range(4)]
    gentle = np.concatenate([augment.robust(digits, s, ("move",), augment.FAR_SHARE["gentle"]).numpy() for s in seeds])
    far = np.concatenate([augment.robust(digits, s, ("move",)).numpy() for s in seeds])
    moved = lambda draws: np.linalg.norm(_centres(draws) - np.tile(_centres(digits), (len(seeds), 1)), axis=1)  # noqa: E731
    # The near end: shifts of up to 1.6 px, plus what a 9-degree turn and a 14% zoom move a centre.
    assert moved(gentle).max() < 3.0 and np.median(moved(gentle)) > 0.5
    assert moved(far).max() > 4.5
    # gentle is the pixel changes of pixels after that move, with the same families left out.
    seed = seeds[0]
    np.testing.assert_array_equal(
        augment.augmenter("gentle", 0)(digits[:32], seed).numpy(),
        augment.robust(digits[:32], seed, augment.kept_changes("gentle"), augment.FAR_SHARE["gentle"]).numpy(),
    )
    assert augment.kept_changes("gentle") == tuple(augment.IMITATES)
    assert augment.kept_changes("pixels") == augment.CHANGES
    assert augment.kept_changes("gentle", ("geometry",)) == augment.CHANGES

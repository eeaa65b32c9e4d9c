"""The search space as the search sees it: the values a trial's choices make active, and
`name=value` pins, checked against the hypermodel's own space before a run opens."""

from __future__ import annotations

import contextlib
import math

import keras_tuner as kt

from experiments import ConfigError


def active_values(hp: kt.HyperParameters) -> dict[str, object]:
    """The trial's hyperparameter values, without those its choices switched off."""
    return {name: value for name, value in hp.values.items() if hp.is_active(name)}


def fixed_hyperparameters(hypermodel: kt.HyperModel, pins: tuple[str, ...]) -> kt.HyperParameters:
    """`name=value` pins as Keras Tuner `Fixed` hyperparameters; a name not in the space raises.

    A pin is declared under the same conditions as the hyperparameter it pins
    (conv_filters_1 exists only when conv_blocks >= 2): Keras Tuner treats a
    `Fixed` without them as another hyperparameter and goes on sampling the
    conditional one.
    """
    space = kt.HyperParameters()
    hypermodel.build(space)
    specs = {hp.name: hp for hp in space.space}
    values = {}
    for pin in pins:
        name, text = (part.strip() for part in pin.split("="))
        if name not in specs:
            raise ConfigError(f"fixed hyperparameter {name!r} is not in the search space: known are {', '.join(sorted(specs))}")
        values[name] = pinned_value(text)
        if isinstance(values[name], float) and not math.isfinite(values[name]):
            raise ConfigError(f"fixed hyperparameter {name}={text} is not a finite number")
        if isinstance(specs[name], kt.engine.hyperparameters.Int) and not isinstance(values[name], int):
            raise ConfigError(f"fixed hyperparameter {name}={text} is not a whole number")
    # The whole space, in the hypermodel's order, with the pins as Fixed: the
    # oracle samples in this order, and a child sampled before its parent is
    # sampled wrongly (with only the parents declared, conv_filters_1 came
    # out 128 in every trial).
    fixed = kt.HyperParameters()
    for spec in space.space:
        with contextlib.ExitStack() as scopes:
            for condition in spec.conditions:
                scopes.enter_context(fixed.conditional_scope(condition.name, condition.values))
            if spec.name in values:
                fixed.Fixed(spec.name, values[spec.name])
            else:
                fixed.merge([spec])  # the public way to declare a copy of a spec
    try:  # a pin the hypermodel cannot build with (head=foo) is refused before a run opens
        hypermodel.build(fixed.copy())
    except (ValueError, TypeError) as err:
        raise ConfigError(f"fixed hyperparameters {', '.join(pins)} cannot build a model: {str(err).splitlines()[0]}") from None
    return fixed


def pinned_value(text: str) -> object:
    """A pin's value as the space holds it: a boolean, an integer, a float, else the text."""
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text

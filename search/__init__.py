"""The hyperparameter search pipeline: data, EDA, tuner, tracking, evaluation, registry."""

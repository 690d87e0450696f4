"""Evaluation: the external classifier (judge), metrics of paper section 4, and run reports."""

from selective_amnesia.evaluate.classifier import (
    ClassifierRecipe,
    MNISTClassifier,
    classifier_accuracy,
    classifier_cache_path,
    load_or_train_classifier,
    train_classifier,
)
from selective_amnesia.evaluate.metrics import (
    accuracy,
    aggregate_seeds,
    forget_metrics,
    frechet_distance,
    per_class_accuracy,
    precision_recall,
)
from selective_amnesia.evaluate.report import image_grid, plot_losses, save_png, write_html_report

__all__ = [
    "ClassifierRecipe",
    "MNISTClassifier",
    "accuracy",
    "aggregate_seeds",
    "classifier_accuracy",
    "classifier_cache_path",
    "forget_metrics",
    "frechet_distance",
    "image_grid",
    "load_or_train_classifier",
    "per_class_accuracy",
    "plot_losses",
    "precision_recall",
    "save_png",
    "train_classifier",
    "write_html_report",
]

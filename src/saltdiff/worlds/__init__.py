"""Synthetic worlds with exact ground truth: scenes, captions, detectors (``detector``) and a
background classifier (``background``)."""

from .shapes import (
    BACKGROUND_STYLES,
    BACKGROUNDS,
    COLORS,
    HELDOUT_SEEDS,
    SHAPES,
    TRAIN_SEEDS,
    VAL_SEEDS,
    Scene,
    SceneObject,
    caption_for,
    heldout_layouts,
    render,
    render_batch,
    render_objects,
    render_single_object,
    sample_scene,
    vocabulary,
)

__all__ = [
    "BACKGROUNDS",
    "BACKGROUND_STYLES",
    "COLORS",
    "HELDOUT_SEEDS",
    "SHAPES",
    "TRAIN_SEEDS",
    "VAL_SEEDS",
    "Scene",
    "SceneObject",
    "caption_for",
    "heldout_layouts",
    "render",
    "render_batch",
    "render_objects",
    "render_single_object",
    "sample_scene",
    "vocabulary",
]

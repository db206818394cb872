"""Ingredient 2 of distillation: who teaches, and how its weights are loaded, combined and cached."""

from lightning_kd.teachers.cache import TeacherOutputCache
from lightning_kd.teachers.ensemble import TeacherEnsemble
from lightning_kd.teachers.loading import freeze, load_weights
from lightning_kd.teachers.view_cache import TeacherViewCache
from lightning_kd.teachers.view_fill import fill_view_cache

__all__ = [
    "TeacherEnsemble",
    "TeacherOutputCache",
    "TeacherViewCache",
    "fill_view_cache",
    "freeze",
    "load_weights",
]

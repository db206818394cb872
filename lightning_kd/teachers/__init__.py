"""Ingredient 2 of distillation: who teaches, and how its weights are loaded, combined and cached."""

from lightning_kd.teachers.cache import TeacherOutputCache
from lightning_kd.teachers.ensemble import TeacherEnsemble
from lightning_kd.teachers.loading import freeze, load_weights

__all__ = ["TeacherEnsemble", "TeacherOutputCache", "freeze", "load_weights"]

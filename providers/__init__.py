"""Concrete teachers (adapters). Each engineer adds their own export lines."""

from providers.self_distill import PrivilegedTemplate, SelfDistillTeacher

__all__ = [
    "PrivilegedTemplate",
    "SelfDistillTeacher",
]

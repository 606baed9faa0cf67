"""Guidance arithmetic and the hooks that run it inside stock pipelines."""
from .formulas import classifier_free_guidance, perturbation_guidance

__all__ = ["classifier_free_guidance", "perturbation_guidance"]

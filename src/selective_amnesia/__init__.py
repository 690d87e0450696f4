"""Selective Amnesia: make a trained conditional generative model forget a concept.

Implements Heng & Soh, "Selective Amnesia: A Continual Learning Approach to Forgetting in Deep
Generative Models" (NeurIPS 2023).
"""

__version__ = "0.1.0"

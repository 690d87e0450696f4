"""Concept-erasure baselines in the Selective Amnesia harness (``method: esd | uce``; docs/baselines.md).

- ``esd``: Gandikota et al., "Erasing Concepts from Diffusion Models" (ICCV 2023), ESD-x and ESD-u.
- ``uce``: Gandikota et al., "Unified Concept Editing in Diffusion Models" (WACV 2024).
- ``run``: the ``amnesia run`` stage that loads theta*, erases, and writes ``forget/`` and ``report.json``.
"""

"""The command line, ``amnesia``: the parser and the commands (``app``), and the commands whose options
live beside their code, ``amnesia attack`` (``attacks``), ``amnesia convert`` (``convert``) and
``amnesia classifiers`` (``classifiers``). ``python -m selective_amnesia.cli`` runs ``main``.
"""

from __future__ import annotations

from selective_amnesia.cli.app import main

__all__ = ["main"]

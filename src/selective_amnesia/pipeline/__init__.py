"""The stages of ``amnesia run`` and the pipelines that chain them, reusing what the same settings made:
the class-conditional families, VAE and DDPM (``classes``), and text-to-image (``t2i``); several concepts
one after another (``sequence``, ``sequence_t2i``). Which family takes which path is the registry's
decision (``selective_amnesia.families``).

Importing this package imports nothing; import the module you need.
"""

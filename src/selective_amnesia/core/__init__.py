"""The method: the loss terms (``objective``), the Fisher estimators (``fisher``, ``fisher_diffusion``),
the concept surrogate and replay (``surrogate``, ``replay``, ``sampling``), the one forgetting loop
(``train``), which weights train (``trainable``), the text-to-image defences (``defences``), the settings
hashes that decide reuse (``cache_keys``) and the multi-process split of the work (``distributed``).

Importing this package imports nothing; import the module you need.
"""

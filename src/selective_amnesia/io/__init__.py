"""What goes to and comes from disk: artifacts (``artifacts``: safetensors + JSON, atomic writes), resumable
training checkpoints (``checkpoint``), run state and locks (``runstate``), pictures (``images``), the
allow-list unpickler for data files (``safe_pickle``) and the reference code's legacy files and Stable
Diffusion single files (``convert``).

Importing this package imports nothing; import the module you need (``selective_amnesia.io.artifacts``).
The name shadows nothing: every import in the library is absolute, so ``import io`` is the standard library's.
"""

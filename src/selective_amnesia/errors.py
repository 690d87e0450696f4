"""Errors the CLI turns into a one-line message and exit status 2."""


class AmnesiaError(Exception):
    """Bad input from the user (config, arguments, files). The message names the problem and the fix."""

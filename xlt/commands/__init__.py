"""Sub-command groups of the ``xlt`` command that live outside ``xlt.cli`` (argparse wiring over the library)."""

"""Sub-commands of the ``kbit`` command line: each module has ``add_arguments`` and ``run``."""

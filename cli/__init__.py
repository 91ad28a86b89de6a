"""The ``hbbus`` command line."""

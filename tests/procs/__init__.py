"""Small programs the integration tests run as real processes (``python -m tests.procs.<name>``)."""

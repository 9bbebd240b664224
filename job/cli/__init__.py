"""The ``cover`` command line: covers and single stages on one machine, voice admin, model-store push and pull."""

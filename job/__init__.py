"""The cover pipeline: fetch -> separate -> convert -> mix, and its entry points."""

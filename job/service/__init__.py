"""The service side of the job: the worker (download, render, upload, publish), render leases, and the entry points."""

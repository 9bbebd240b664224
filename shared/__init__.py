"""Contracts and plumbing shared by the dispatcher and the job, torch-free: events, options,
errors, settings, storage, the bus, the model store."""

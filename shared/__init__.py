"""Contracts shared by the dispatcher and the job: errors, settings, voice metadata, safe loading."""

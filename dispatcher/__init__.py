"""The HTTP face of the service (functions-framework functions)."""

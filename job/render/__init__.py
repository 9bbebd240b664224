"""The stages of a cover (fetch, separate, convert, mix), the one pipeline that sequences them, and the RVC engine."""

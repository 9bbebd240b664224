"""Stage 2, separate: Demucs' packages (``loading``), the separator (``separator``) and the stem cache (``stems``)."""

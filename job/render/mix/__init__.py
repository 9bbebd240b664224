"""Stage 5, mix: the mixer and encoder (``mixer``), loudness and true peak (``loudness``), the
limiter (``limiter``) and the mix's own scores (``meter``)."""

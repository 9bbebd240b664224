"""A fairseq-free RVC (Retrieval-based Voice Conversion) inference engine.

Layout: :mod:`checkpoint` reads voice ``.pth`` files, :mod:`synthesizer` (with :mod:`attention`,
:mod:`flow`, :mod:`generator`) is the network, :mod:`content` the HuBERT features,
:mod:`pitch` and :mod:`rmvpe` the f0 trackers, :mod:`retrieval` the faiss index blend, and
:mod:`engine` puts them together over long audio.
"""

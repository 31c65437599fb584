"""The CM3 document and prompt format (paper §3.1), written once: training, evaluation and
generation all build their token sequences here."""

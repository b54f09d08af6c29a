"""Unit tests, one file per module of ds_mlm (the one-minute loop: `pytest tests -m "not slow"`); the few tests here
that start real engines or processes are marked slow."""

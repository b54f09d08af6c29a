"""Unit tests of ds_mlm.data, one file per module."""

"""The data pipeline: text files -> token store on disk (built once, checked against its inputs) -> samples.

    text.py      reading files as clean lines in bounded memory (BOMs, CRLF, invalid UTF-8, huge lines counted)
    spec.py      DatasetSpec: the inputs of a store, their fingerprint, and how the tokenizer is asked for ids
    packing.py   numba kernels packing sentences into samples (full sentences, or line by line), streaming-exact
    store.py     the on-disk format (data.bin + data.idx), its atomic writer and its zero-copy reader
    build.py     ensure_store / build_store: the pipelined, multi-process build and its report
    datasets.py  the ancestor's dataset classes (MemmapConcatFullSentenceTextDataset, ...) over token stores
"""

from ds_mlm.data.build import BuildReport, build_store, ensure_store
from ds_mlm.data.datasets import (ConcatDataset, MemmapConcatFullSentenceTextDataset, MemmapLineByLineTextDataset,
                                  PaddedDataset)
from ds_mlm.data.packing import Packer, PackStats, pack_full_sentences, pack_lines
from ds_mlm.data.spec import DatasetSpec, list_text_files
from ds_mlm.data.store import StaleCacheError, TokenStore, open_store
from ds_mlm.data.text import ReadStats

__all__ = ["BuildReport", "ConcatDataset", "DatasetSpec", "MemmapConcatFullSentenceTextDataset",
           "MemmapLineByLineTextDataset", "PackStats", "Packer", "PaddedDataset", "ReadStats", "StaleCacheError",
           "TokenStore", "build_store", "ensure_store", "list_text_files", "open_store", "pack_full_sentences",
           "pack_lines"]

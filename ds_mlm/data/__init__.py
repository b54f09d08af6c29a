"""The data pipeline: input files -> token shards on disk (built once, checked against their inputs) -> samples.

    formats.py       which files a directory holds; their text as UTF-8 bytes (txt, jsonl, parquet; .gz, .zst)
    text.py          clean lines out of those bytes, in bounded memory (BOMs, CRLF, invalid UTF-8, huge lines counted)
    spec.py          fingerprints of input files and tokenizers, and how a tokenizer is asked for ids
    dataset_plan.py  a dataset's sources and shards (one per file or piece), their fingerprints, balanced shares
    packing.py       numba kernels packing sentences into samples (best fit or sequential, or line by line)
    store.py         one shard on disk (data.bin + data.idx, checksummed), its atomic writer and zero-copy reader
    workers.py       the tokenizer worker processes: ordered results, ended by any error or signal
    build.py         build_shards: the pipelined, multi-process, resumable build of a list of shards, and its report
    manifest.py      a dataset's layout, its manifest and index, ShardedStore (one view over all shards), open_store
    region.py        one read-only array over many files (the shards mapped side by side)
    group.py         the processes building one cache together, through the job's rendezvous store
    ensure.py        the one build policy: lock, reuse what is sound, deal and build the rest, write the manifest;
                     ensure_datasets for a group of processes, ensure_dataset for one (a group of one)
    verify.py        the data checksums: once per host, always or never; `python -m ds_mlm.data.verify`
    mixture.py       Mixture: weighted sources as one random-access dataset, samples_by_source, describe()
    datasets.py      DatasetSpec / ensure_store for one source, and the ancestor's dataset classes
    prepare.py       a run's datasets: which files, plans shared and compared across nodes, build groups, open, Mixture
"""

from ds_mlm.data.build import BuildReport, build_shards
from ds_mlm.data.dataset_plan import BuildOptions, DatasetPlan, plan_dataset
from ds_mlm.data.datasets import (ConcatDataset, DatasetSpec, MemmapConcatFullSentenceTextDataset,
                                  MemmapLineByLineTextDataset, PaddedDataset, build_store, ensure_store)
from ds_mlm.data.ensure import ensure_dataset, ensure_datasets
from ds_mlm.data.formats import list_input_files
from ds_mlm.data.manifest import ShardedStore, open_store
from ds_mlm.data.mixture import Mixture
from ds_mlm.data.packing import Packer, PackStats, pack_full_sentences, pack_lines
from ds_mlm.data.spec import list_text_files
from ds_mlm.data.store import DamagedStore, StaleCacheError, TokenStore
from ds_mlm.data.text import ReadStats

__all__ = ["BuildOptions", "BuildReport", "ConcatDataset", "DamagedStore", "DatasetPlan", "DatasetSpec",
           "MemmapConcatFullSentenceTextDataset", "MemmapLineByLineTextDataset", "Mixture", "PackStats", "Packer",
           "PaddedDataset", "ReadStats", "ShardedStore", "StaleCacheError", "TokenStore", "build_shards",
           "build_store", "ensure_dataset", "ensure_datasets", "ensure_store", "list_input_files", "list_text_files",
           "open_store", "pack_full_sentences", "pack_lines", "plan_dataset"]

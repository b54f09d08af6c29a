"""A source's files as one dataset (`DatasetSpec`, `ensure_store`), and the dataset classes of
thai2transformers, by name and positional signature, over ds-mlm's sharded token datasets.

Old code keeps working: `MemmapConcatFullSentenceTextDataset(tokenizer, file_path, block_size, datasets_cache_dir,
chunk_size, overwrite_cache)` builds (or reuses, when its inputs are unchanged) a token dataset in
`datasets_cache_dir` and is that dataset. `file_path` may be one file or a list of files (the ancestor read one).
Without `datasets_cache_dir`, the dataset goes to `.ds_mlm_cache/` beside the first file.
"""

import bisect
import os
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Union

import numpy as np
import torch

from ds_mlm.data.build import BuildReport
from ds_mlm.data.dataset_plan import BuildOptions, DatasetPlan, plan_dataset
from ds_mlm.data.ensure import ensure_dataset
from ds_mlm.data.manifest import ShardedStore, known_identities, read_manifest
from ds_mlm.data.packing import CONCAT, LINE_BY_LINE
from ds_mlm.errors import UserError

PathOrPaths = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]


@dataclass(init=False)
class DatasetSpec:
    """The files of one source and how to build them; `plan()` and `fingerprint()` identify the dataset.

    DatasetSpec(files, tokenizer, BuildOptions(128, packing="sequential")), or BuildOptions' own arguments in its
    place: DatasetSpec(files, tokenizer, 128, packing="sequential")."""

    files: List[str]
    """The input files, read in this order (list_text_files sorts them); one path or a sequence of them."""
    tokenizer: Any
    """The tokenizer (see spec.py for what it must offer)."""
    options: BuildOptions
    """How samples are made from the text (dataset_plan.py)."""

    def __init__(self, files: PathOrPaths, tokenizer, options: Union[BuildOptions, int], *args, **kwargs):
        self.files = [os.fspath(p) for p in ([files] if isinstance(files, (str, os.PathLike)) else files)]
        if not self.files:
            raise UserError("no input text file given: add *.txt files to the data directory")
        for path in self.files:
            if not os.path.isfile(path):
                raise UserError(f"{path}: no such file; give existing text files")
        self.tokenizer = tokenizer
        self.options = options if isinstance(options, BuildOptions) else BuildOptions(options, *args, **kwargs)

    def plan(self, known: Optional[dict] = None) -> DatasetPlan:
        """One source, named after the directory of the first file."""
        return plan_dataset([(os.path.dirname(os.path.abspath(self.files[0])), self.files)], self.tokenizer,
                            self.options, known)

    def fingerprint(self) -> str:
        return self.plan().fingerprint


def ensure_store(spec: DatasetSpec, path: str, num_workers: Optional[int] = None, chunk_size: int = 2500,
                 overwrite: bool = False, fingerprint: Optional[str] = None,
                 verify: str = "once") -> Optional[BuildReport]:
    """Build the dataset of `spec` at `path` where it is missing, stale, damaged or `overwrite`; only the shards
    that need it are tokenized. None when the dataset there matched. (`fingerprint` is accepted for old callers.)"""
    plan = spec.plan(known_identities(read_manifest(path)))
    return ensure_dataset(plan, path, spec.tokenizer, num_workers, chunk_size, overwrite, verify)


def build_store(spec: DatasetSpec, path: str, num_workers: Optional[int] = None, chunk_size: int = 2500,
                fingerprint: Optional[str] = None) -> BuildReport:
    """Build every shard of `spec` at `path` again (benchmarks; runs use ensure_store)."""
    return ensure_store(spec, path, num_workers, chunk_size, overwrite=True)


class _BuiltStore(ShardedStore):
    """A token dataset built (or reused, when its inputs are unchanged) when the dataset is constructed."""

    datasets_type: str

    def __init__(self, tokenizer, file_path: PathOrPaths, block_size: int, datasets_cache_dir: Optional[str] = None,
                 chunk_size: int = 2500, overwrite_cache: bool = False, long_sentence: str = "split",
                 num_workers: Optional[int] = None, packing: str = "best_fit"):
        spec = DatasetSpec(file_path, tokenizer, BuildOptions(block_size, self.datasets_type, long_sentence,
                                                              packing=packing))
        if datasets_cache_dir is None:  # beside the first file, one dataset per type and block size
            first = os.path.abspath(spec.files[0])
            datasets_cache_dir = os.path.join(os.path.dirname(first), ".ds_mlm_cache",
                                              f"{os.path.basename(first)}.{self.datasets_type}.{block_size}")
        os.makedirs(os.path.dirname(os.path.abspath(datasets_cache_dir)), exist_ok=True)
        # The build's report, or None when an up-to-date dataset was reused.
        self.report: Optional[BuildReport] = ensure_store(spec, datasets_cache_dir, num_workers, chunk_size,
                                                          overwrite_cache)
        super().__init__(datasets_cache_dir)

    def __setstate__(self, state):
        ShardedStore.__setstate__(self, state)  # not a subclass's builder


class MemmapConcatFullSentenceTextDataset(_BuiltStore):
    """Whole sentences packed into blocks of at most block_size ids (packing.py)."""

    datasets_type = CONCAT


class MemmapLineByLineTextDataset(_BuiltStore):
    """One sample per line, at most block_size ids."""

    datasets_type = LINE_BY_LINE


class PaddedDataset(torch.utils.data.Dataset):
    """Every sample of `dataset` right-padded with `padding_idx` to `block_size` ids (the ancestor's eval wrapper)."""

    def __init__(self, dataset, padding_idx: int, block_size: int):
        self.dataset, self.padding_idx, self.block_size = dataset, int(padding_idx), int(block_size)

    def __len__(self) -> int:
        return len(self.dataset)

    def _pad(self, sample) -> np.ndarray:
        sample = np.asarray(sample)
        if sample.size > self.block_size:
            raise ValueError(f"a sample of {sample.size} ids does not fit block_size {self.block_size}")
        out = np.full(self.block_size, self.padding_idx, dtype=np.int64)
        out[:sample.size] = sample
        return out

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self._pad(self.dataset[i]))

    def __getitems__(self, indices: Sequence[int]) -> List[np.ndarray]:
        return [self._pad(s) for s in _getitems(self.dataset, indices)]


class ConcatDataset(torch.utils.data.Dataset):
    """The samples of several datasets one after the other."""

    def __init__(self, datasets: Sequence):
        self.datasets = list(datasets)
        self.cumulative_sizes = np.cumsum([len(d) for d in self.datasets]).tolist()

    def __len__(self) -> int:
        return self.cumulative_sizes[-1] if self.cumulative_sizes else 0

    def _locate(self, i: int):
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        i %= len(self)
        d = bisect.bisect_right(self.cumulative_sizes, i)
        return d, i - (self.cumulative_sizes[d - 1] if d else 0)

    def __getitem__(self, i: int):
        d, j = self._locate(i)
        return self.datasets[d][j]

    def __getitems__(self, indices: Sequence[int]) -> list:
        """Batched per dataset, so each store answers with one vectorised read."""
        located = [self._locate(int(i)) for i in indices]
        out = [None] * len(located)
        for d, dataset in enumerate(self.datasets):
            where = [k for k, (dd, _) in enumerate(located) if dd == d]
            for k, sample in zip(where, _getitems(dataset, [located[k][1] for k in where])):
                out[k] = sample
        return out


def _getitems(dataset, indices: Sequence[int]) -> list:
    getitems = getattr(dataset, "__getitems__", None)
    return getitems(list(indices)) if getitems else [dataset[i] for i in indices]

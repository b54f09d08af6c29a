"""Train a tokenizer from a folder of text files: `ds-mlm-train-tokenizer` / `python -m ds_mlm.train_tokenizer`.

    python -m ds_mlm.train_tokenizer --type spm --input_dir corpus/ --vocab_size 24000 --output_dir tok/

Types: `spm` (SentencePiece, `--model_type unigram|bpe`), `newmm` and `syllable` (word-level, words cut by PyThaiNLP),
`sefr_cut` (word-level from text pre-segmented with `<|>`), `bpe` (a byte-level BPE RobertaTokenizerFast, for
English). The output directory is what `--tokenizer_name_or_path` takes, with `--tokenizer_type auto` or the
matching type; `<s> <pad> </s> <unk> <mask>` have ids 0-4 in every kind (word vocabularies then `<_>` 5, `\\n` 6;
SentencePiece `<_>` 5).

Text: every `*.{ext}` file of `--input_dir` (sorted), read as the training data is (ds_mlm.data.text): lines
stripped, byte-order marks removed, blank lines dropped.
Work is spread over `--num_workers` processes (word counting) or threads (SentencePiece, BPE).
"""

import argparse
import collections
import dataclasses
import io
import itertools
import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Iterator

import sentencepiece as spm
from tokenizers import ByteLevelBPETokenizer
from tqdm import tqdm
from transformers import RobertaTokenizer

from ds_mlm.args import arg
from ds_mlm.data.spec import list_text_files
from ds_mlm.data.text import LineReader, ReadStats
from ds_mlm.data.workers import OrderedPool
from ds_mlm.errors import UserError, cli
from ds_mlm.output import setup_logging
from ds_mlm.tokenization import (SPACE_TOKEN, SPECIAL_TOKENS, TOKENIZER_TYPES, ThaiRobertaTokenizer,
                                  load_tokenizer)
from ds_mlm.tokenization.words import RESERVED_TOKENS, pre_tokenize

TYPES = ("spm", "newmm", "syllable", "sefr_cut", "bpe")
WORD_TYPES = ("newmm", "syllable", "sefr_cut")
SPM_MODEL_TYPES = ("unigram", "bpe")
log = logging.getLogger(__name__)
BLOCK_BYTES = 1 << 18  # text read at once, and one word-counting task: ~0.2 s of newmm, far above the IPC cost


@dataclass
class TrainTokenizerArguments:
    """What to train, from which text, and where to write it."""

    type: str = field(metadata={"help": f"Tokenizer kind: {', '.join(TYPES)}."})
    input_dir: str = field(metadata={"help": "Directory of training text (every *.EXT file in it, see --ext)."})
    output_dir: str = field(metadata={"help": "Directory to write the tokenizer to (created if missing)."})
    vocab_size: int = arg(24000, "Vocabulary size, <s> <pad> </s> <unk> <mask> <_> included.")
    min_frequency: int = arg(1, "Word-level and bpe: drop words / merges seen fewer times.")
    model_type: str = arg("unigram", f"spm: {' or '.join(SPM_MODEL_TYPES)}.")
    input_sentence_size: int = arg(0, "spm: train on this many lines sampled from the corpus (0: all); "
                                      "SentencePiece holds them in memory.")
    ext: str = arg("txt", "Extension of the text files, with or without the dot.")
    num_workers: int = arg(0, "Processes (word counting) or threads (spm, bpe); 0: all cores.")
    files: list = field(init=False, metadata={"help": "The text files found (set from input_dir and ext)."})

    def __post_init__(self):
        if self.type not in TYPES:
            raise UserError(f"unknown --type {self.type!r}: use one of {', '.join(TYPES)}")
        if self.model_type not in SPM_MODEL_TYPES:
            raise UserError(f"unknown --model_type {self.model_type!r}: use one of {', '.join(SPM_MODEL_TYPES)}")
        reserved = 7 if self.type in WORD_TYPES else 6  # <s> <pad> </s> <unk> <mask> <_> (and \n for words)
        if self.vocab_size <= reserved:
            raise UserError(f"--vocab_size {self.vocab_size} leaves no room beside the {reserved} reserved tokens "
                            f"(<s> <pad> </s> <unk> <mask> <_>...): use a larger --vocab_size")
        if self.min_frequency < 1:
            raise UserError("--min_frequency must be at least 1")
        if self.num_workers < 0 or self.input_sentence_size < 0:
            raise UserError("--num_workers and --input_sentence_size must be 0 or more")
        self.files = list_text_files(self.input_dir, self.ext, "--input_dir")  # no corpus: fail before anything is written
        self.num_workers = self.num_workers or len(os.sched_getaffinity(0))  # as the dataset build counts them


def read_blocks(files: list[str]) -> Iterator[list[str]]:
    """The clean lines of `files` (as the training data reader cleans them: stripped, no BOM, no blank line), a
    list per block read, with a progress bar over the bytes and a summary of the repairs at the end."""
    total, stats = sum(os.path.getsize(f) for f in files), ReadStats()
    with tqdm(total=total, unit="B", unit_scale=True, desc="reading", file=sys.stderr) as bar:
        for path in files:
            reader = LineReader(path, read_bytes=BLOCK_BYTES)
            try:
                for lines, size in reader:
                    bar.update(size)
                    if lines:
                        yield lines
            except OSError as e:
                raise UserError(f"{path}: cannot read it ({e.strerror}): check the file and its permissions") from None
            stats += reader.stats
    log.info("read %d lines of %d file(s): dropped %d blank lines, removed %d byte-order marks, replaced %d invalid "
             "UTF-8 sequences, cut %d over-long lines", stats.lines, stats.files, stats.blank_lines, stats.boms,
             stats.replaced, stats.long_lines)


def read_lines(files: list[str]) -> Iterator[str]:
    return itertools.chain.from_iterable(read_blocks(files))


# -- SentencePiece ------------------------------------------------------------------------------------------------

def train_spm(args: TrainTokenizerArguments) -> None:
    # Spaces become <_> as in the ancestor's preprocessing, so SentencePiece never sees one (see tokenization.spm).
    sentences = (line.replace(" ", SPACE_TOKEN) for line in read_lines(args.files))
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences, model_writer=model, model_type=args.model_type,
            vocab_size=args.vocab_size, num_threads=args.num_workers,
            bos_id=0, pad_id=1, eos_id=2, unk_id=3, user_defined_symbols=["<mask>", SPACE_TOKEN],  # ids 0-5
            character_coverage=1.0,  # Thai has ~70 letters and all matter: no character becomes <unk>
            normalization_rule_name="identity", remove_extra_whitespaces=False,  # decoding gives the text back
            add_dummy_prefix=False,  # no ▁ before each run of text between two <_>
            hard_vocab_limit=False,  # a small corpus may not fill --vocab_size: stop there instead of failing
            input_sentence_size=args.input_sentence_size, max_sentence_length=1 << 16)  # its log is its progress
    except RuntimeError as e:
        raise UserError(f"SentencePiece could not train on {args.input_dir}: {str(e).strip()}") from e
    path = os.path.join(args.output_dir, ThaiRobertaTokenizer.vocab_files_names["vocab_file"])
    with open(path, "wb") as f:
        f.write(model.getvalue())
    ThaiRobertaTokenizer(vocab_file=path).save_pretrained(args.output_dir)


# -- word level ---------------------------------------------------------------------------------------------------

def _count_words(task: tuple[str, list[str]]) -> collections.Counter:
    kind, lines = task
    counts = collections.Counter()
    for line in lines:
        counts.update(pre_tokenize(kind, line))
    return counts


def count_words(args: TrainTokenizerArguments) -> collections.Counter:
    """Word counts over the corpus, cut by the pre-tokenizer the tokenizer itself uses, a block per worker task."""
    pre_tokenize(args.type, "")  # loads PyThaiNLP and its dictionary (2 s) once, here: forked workers inherit them
    tasks = ((args.type, block) for block in read_blocks(args.files))
    total = collections.Counter()
    if args.num_workers == 1:
        for task in tasks:
            total.update(_count_words(task))
        return total
    # OrderedPool, not multiprocessing.Pool: its workers end with any error or signal, and take SIGTERM whatever
    # handlers this process has (a Pool's terminate() hangs on a worker that inherited an ignored SIGTERM).
    with OrderedPool(_count_words, args.num_workers) as pool:
        for task in tasks:
            pool.submit((task,))
            if pool.in_flight == 2 * args.num_workers:  # two blocks per worker ahead: bounded memory
                total.update(pool.next())
        while pool.in_flight:
            total.update(pool.next())
    return total


def train_words(args: TrainTokenizerArguments) -> None:
    counts = count_words(args)
    for token in RESERVED_TOKENS:
        counts.pop(token, None)
    # Most frequent first, ties by the word itself: the same corpus always gives the same ids.
    ranked = sorted((w for w, c in counts.items() if c >= args.min_frequency), key=lambda w: (-counts[w], w))
    if not ranked:
        raise UserError(f"no word of {args.input_dir} is seen {args.min_frequency} times: lower --min_frequency")
    words = list(RESERVED_TOKENS) + ranked[:args.vocab_size - len(RESERVED_TOKENS)]
    cls = TOKENIZER_TYPES[args.type]
    path = os.path.join(args.output_dir, cls.vocab_files_names["vocab_file"])
    with open(path, "w", encoding="utf-8") as f:
        json.dump({w: i for i, w in enumerate(words)}, f, ensure_ascii=False, indent=0)
    cls(vocab_file=path).save_pretrained(args.output_dir)


# -- byte-level BPE -----------------------------------------------------------------------------------------------

def train_bpe(args: TrainTokenizerArguments) -> None:
    os.environ["RAYON_NUM_THREADS"] = str(args.num_workers)  # read when tokenizers starts its thread pool
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(read_lines(args.files), vocab_size=args.vocab_size, min_frequency=args.min_frequency,
                            special_tokens=list(SPECIAL_TOKENS))
    with tempfile.TemporaryDirectory() as tmp:
        bpe.save_model(tmp)
        tokenizer = RobertaTokenizer(vocab=os.path.join(tmp, "vocab.json"), merges=os.path.join(tmp, "merges.txt"))
    tokenizer.save_pretrained(args.output_dir)


TRAINERS = {"spm": train_spm, "bpe": train_bpe, **{kind: train_words for kind in WORD_TYPES}}


def train(args: TrainTokenizerArguments) -> str:
    """Train the tokenizer `args` describes and write it to args.output_dir; return that directory."""
    os.makedirs(args.output_dir, exist_ok=True)
    log.info("training a %s tokenizer of %d ids on %d file(s) of %s with %d worker(s)", args.type, args.vocab_size,
             len(args.files), args.input_dir, args.num_workers)
    TRAINERS[args.type](args)
    return args.output_dir


def parse_args(argv=None) -> TrainTokenizerArguments:
    parser = argparse.ArgumentParser(prog="ds-mlm-train-tokenizer", description=__doc__.splitlines()[0])
    for f in dataclasses.fields(TrainTokenizerArguments):
        if not f.init:
            continue
        required = f.default is dataclasses.MISSING
        parser.add_argument(f"--{f.name}", type=str if required else type(f.default), required=required,
                            default=None if required else f.default, help=f.metadata["help"])
    return TrainTokenizerArguments(**vars(parser.parse_args(argv)))


def main(argv=None) -> int:
    setup_logging(stream=sys.stderr)  # stdout stays free for what a script may read
    output_dir = train(parse_args(argv))
    tokenizer = load_tokenizer(output_dir, "auto")  # what the user will do next: it must work
    print(f"wrote {type(tokenizer).__name__} with {len(tokenizer)} ids to {output_dir}", file=sys.stderr)  # the result
    return 0


cli_main = cli(main)

if __name__ == "__main__":
    cli_main()

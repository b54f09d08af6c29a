"""Tokenizers: `load_tokenizer` for `--tokenizer_name_or_path` / `--tokenizer_type`, and ds-mlm's tokenizer classes.

Types (short name / the ancestor's class name, and the file that marks a directory of that type):

    auto                                  any directory AutoTokenizer loads (a ds-mlm one included), fast preferred
    spm       / ThaiRobertaTokenizer       sentencepiece.bpe.model
    newmm     / ThaiWordsNewmmTokenizer    newmm.json
    syllable  / ThaiWordsSyllableTokenizer syllable.json
    sefr_cut  / FakeSefrCutTokenizer       fake_sefr_cut.json

Every ds-mlm type has `<s> <pad> </s> <unk> <mask>` at ids 0-4 and the RoBERTa layout (`<s> A </s></s> B </s>`).
Spaces, with `--add_space_token`: each space becomes the token `<_>` and decoding restores it. Without the flag:

    spm                         a model with a `<_>` piece (every one ds-mlm-train-tokenizer writes) still maps
                                spaces to `<_>`; any other model leaves them to SentencePiece (`▁`), which restores
                                them too
    newmm, syllable, sefr_cut   spaces only separate words and are dropped: decoding joins the words without them
    other HF tokenizers         they handle spaces themselves (byte-level BPE keeps them); the flag has no effect
                                there: one warning line says so, so the ancestor's command runs unchanged

Importing this package registers the classes with AutoTokenizer, so a saved directory loads back with
`AutoTokenizer.from_pretrained(dir)`; without ds-mlm, `AutoTokenizer.from_pretrained(dir, trust_remote_code=True)`
loads it from the module files saved beside the vocabulary.
"""

import json
import logging
import os

from transformers import AutoTokenizer
from transformers.models.auto import tokenization_auto

from ds_mlm.errors import UserError

from .base import SPACE_TOKEN, SPECIAL_TOKENS, RobertaLayoutTokenizer
from .spm import ThaiRobertaTokenizer
from .words import FakeSefrCutTokenizer, ThaiWordsNewmmTokenizer, ThaiWordsSyllableTokenizer

log = logging.getLogger(__name__)

__all__ = ["load_tokenizer", "resolve_type", "TOKENIZER_TYPES", "SPECIAL_TOKENS", "SPACE_TOKEN",
           "RobertaLayoutTokenizer", "ThaiRobertaTokenizer", "ThaiWordsNewmmTokenizer", "ThaiWordsSyllableTokenizer",
           "FakeSefrCutTokenizer"]

TOKENIZER_TYPES = {
    "spm": ThaiRobertaTokenizer,
    "newmm": ThaiWordsNewmmTokenizer,
    "syllable": ThaiWordsSyllableTokenizer,
    "sefr_cut": FakeSefrCutTokenizer,
}

for _cls in TOKENIZER_TYPES.values():
    # AutoTokenizer.register wants a config class to map, and ours share RobertaConfig with RoBERTa's own tokenizer:
    # register by class name only, which is how AutoTokenizer finds the `tokenizer_class` of tokenizer_config.json.
    tokenization_auto.REGISTERED_TOKENIZER_CLASSES[_cls.__name__] = _cls
    # save_pretrained then also copies the class's module files and writes an `auto_map`, so code without ds-mlm
    # loads the directory with AutoTokenizer.from_pretrained(dir, trust_remote_code=True).
    _cls.register_for_auto_class("AutoTokenizer")


def _type_names() -> str:
    return ", ".join(["auto"] + [f"{short}/{cls.__name__}" for short, cls in TOKENIZER_TYPES.items()])


def resolve_type(tokenizer_type: str):
    """The class for a short or class name, None for `auto`; a UserError listing the valid names otherwise."""
    if tokenizer_type == "auto":
        return None
    for short, cls in TOKENIZER_TYPES.items():
        if tokenizer_type in (short, cls.__name__):
            return cls
    raise UserError(f"unknown tokenizer type {tokenizer_type!r}: use one of {_type_names()}")


def _vocab_file(cls) -> str:
    return cls.vocab_files_names["vocab_file"]


def _types_found(path: str) -> list[str]:
    """Short names of the ds-mlm types whose vocabulary file is in `path`."""
    return [short for short, cls in TOKENIZER_TYPES.items() if os.path.isfile(os.path.join(path, _vocab_file(cls)))]


def _saved_class(path: str):
    """The ds-mlm class named by the directory's tokenizer_config.json, if any."""
    config = os.path.join(path, "tokenizer_config.json")
    if not os.path.isfile(config):
        return None
    try:
        with open(config, encoding="utf-8") as f:
            name = json.load(f).get("tokenizer_class")
    except (ValueError, AttributeError) as e:
        raise UserError(f"{config} is not a JSON object ({e}): repair it, or save the tokenizer again") from e
    return next((cls for cls in TOKENIZER_TYPES.values() if cls.__name__ == name), None)


def _describe(path: str) -> str:
    files = sorted(os.listdir(path))
    shown = ", ".join(files[:8]) + (", ..." if len(files) > 8 else "")
    return f"it holds {shown}" if files else "it is empty"


def load_tokenizer(path, tokenizer_type: str = "auto", add_space_token: bool = False, use_fast: bool = True):
    """Load the tokenizer in directory `path` as `tokenizer_type` (see the module docstring).

    `add_space_token=True` turns the space token on for a ds-mlm type (a directory saved with it on keeps it on);
    tokenizers of other kinds handle spaces themselves: the flag is ignored there, with one warning. `use_fast` is passed to
    AutoTokenizer (transformers 5 always builds the fast, Rust-backed tokenizer when the directory allows one)."""
    cls = resolve_type(tokenizer_type)
    if not path:
        raise UserError("no tokenizer given: pass --tokenizer_name_or_path DIR (train one with ds-mlm-train-tokenizer)")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserError(f"tokenizer directory {path} does not exist: check --tokenizer_name_or_path "
                        "(train one with ds-mlm-train-tokenizer)")
    if not os.path.isdir(path):
        raise UserError(f"--tokenizer_name_or_path {path} is a file: give the directory that holds the tokenizer")
    found = _types_found(path)
    if cls is None:
        cls = _saved_class(path)
        if cls is None and len(found) == 1 and not os.path.isfile(os.path.join(path, "tokenizer.json")):
            cls = TOKENIZER_TYPES[found[0]]  # e.g. an ancestor's directory without a tokenizer_config.json
    elif not os.path.isfile(os.path.join(path, _vocab_file(cls))):
        fits = (f"--tokenizer_type {found[0]} (or auto) fits it" if found else
                "--tokenizer_type auto may load it")
        raise UserError(f"--tokenizer_type {tokenizer_type} needs {_vocab_file(cls)} in {path}, but "
                        f"{_describe(path)}: {fits}")
    if cls is not None:
        extra = {"add_space_token": True} if add_space_token else {}
        try:
            return cls.from_pretrained(path, local_files_only=True, **extra)
        except (OSError, ValueError, TypeError, KeyError) as e:  # a missing or damaged vocabulary file
            raise UserError(f"cannot load {cls.__name__} from {path} ({_describe(path)}; {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}): the tokenizer files are missing or "
                            "damaged; train the tokenizer again (ds-mlm-train-tokenizer)") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, use_fast=use_fast, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise UserError(f"no tokenizer could be loaded from {path} ({_describe(path)}; {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}): give an HF tokenizer directory or one "
                        f"written by ds-mlm-train-tokenizer, or set --tokenizer_type ({_type_names()})") from e
    if add_space_token:  # the ancestor's command always carries it: it must run unchanged
        log.warning("--add_space_token has no effect on %s (a %s, which handles spaces itself): ignored; it applies "
                    "to the %s tokenizer types", path, type(tokenizer).__name__, ", ".join(TOKENIZER_TYPES))
    return tokenizer

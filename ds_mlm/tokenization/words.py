"""Word-level tokenizers: a JSON vocabulary {word: id} and a pre-tokenizer that cuts text into words.

    ThaiWordsNewmmTokenizer     newmm.json          PyThaiNLP's newmm maximal matching over its Thai word dictionary
    ThaiWordsSyllableTokenizer  syllable.json       the same matcher over its Thai syllable dictionary
    FakeSefrCutTokenizer        fake_sefr_cut.json  text already segmented offline, words separated by `<|>`

Both dictionaries ship inside PyThaiNLP (nothing is downloaded) and are extended with the special tokens, as in the
ancestor. Words missing from the vocabulary become `<unk>`.

Spaces: with `add_space_token` every space becomes `<_>` and decoding restores it. Without it spaces only separate
words and are dropped, so decoding joins the words with nothing between them (right for Thai, which writes no space
between words; English words run together). sefr_cut's `<|>` marks are never part of a word and decode to nothing.
"""

import functools
import json
import os

from .base import SPACE_TOKEN, SPECIAL_TOKENS, RobertaLayoutTokenizer

NEWLINE_TOKEN = "\n"  # the ancestor's line-break token, the separator of its concat dataset without a ▁ piece
RESERVED_TOKENS = (*SPECIAL_TOKENS, SPACE_TOKEN, NEWLINE_TOKEN)  # ids 0-6 of every word vocabulary, in this order
SEFR_CUT_SEPARATOR = "<|>"
CACHE_CHUNKS = 1 << 18  # chunks whose ids batch_encode_ids remembers (~70 MB per process), then it starts afresh


@functools.lru_cache(maxsize=None)
def _dictionary(kind: str):
    """PyThaiNLP's word or syllable dictionary plus the reserved tokens, as the trie newmm matches against."""
    from pythainlp.corpus import thai_syllables, thai_words  # read from files packaged with PyThaiNLP
    from pythainlp.util import Trie

    words = thai_words() if kind == "newmm" else thai_syllables()
    return Trie(set(words) | set(RESERVED_TOKENS))


def pre_tokenize(kind: str, text: str) -> list[str]:
    """The words of `text` for a tokenizer kind (newmm, syllable or sefr_cut); whitespace is dropped."""
    if kind == "sefr_cut":
        return [word for part in text.split(SEFR_CUT_SEPARATOR) for word in part.split()]
    from pythainlp.tokenize.newmm import segment

    # No word spans a space, and newmm's matching can run across one: cut each space-separated part on its own, so
    # a line cuts the same whether its spaces become <_> tokens (which split it first) or not, and the vocabulary
    # (counted by train_tokenizer through this same function) always covers what tokenizing produces.
    trie = _dictionary(kind)
    return [word for part in text.split() for word in segment(part, custom_dict=trie) if not word.isspace()]


class ThaiWordsTokenizer(RobertaLayoutTokenizer):
    """A word vocabulary with a pre-tokenizer `kind`; see the module docstring."""

    kind: str = ""  # set by each subclass: the pre_tokenize kind

    def __init__(self, vocab_file: str, add_space_token: bool = False, **kwargs):
        self.vocab_file = vocab_file
        with open(vocab_file, encoding="utf-8") as f:
            self.vocab: dict[str, int] = json.load(f)
        self.ids_to_tokens = {i: token for token, i in self.vocab.items()}
        self._chunk_ids: dict[str, list[int]] = {}
        super().__init__(add_space_token=add_space_token, **kwargs)

    def __getstate__(self):
        return {**self.__dict__, "_chunk_ids": {}}  # the cache is rebuilt, not shipped to workers

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def get_vocab(self) -> dict[str, int]:
        return {**self.vocab, **self._added_tokens_encoder}

    def _convert_token_to_id(self, token: str) -> int:
        return self.vocab.get(token, self.unk_token_id)

    def _convert_id_to_token(self, index: int) -> str:
        return self.ids_to_tokens.get(index, self.unk_token)

    def _tokenize(self, text: str) -> list[str]:
        return pre_tokenize(self.kind, text)

    def _encode_chunks(self, chunks: list[str]) -> list[list[int]]:
        # Cutting (PyThaiNLP, pure Python) is the cost, and text repeats: 72% of the chunks between two spaces of the
        # sample news were seen before. So each chunk is cut once; the lookup skips transformers' indirections.
        cache, lookup, unk = self._chunk_ids, self.vocab.get, self.unk_token_id
        out = []
        for chunk in chunks:
            ids = cache.get(chunk)
            if ids is None:
                if len(cache) >= CACHE_CHUNKS:
                    cache.clear()
                ids = cache[chunk] = [lookup(word, unk) for word in pre_tokenize(self.kind, chunk)]
            out.append(ids)
        return out

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        name = (filename_prefix + "-" if filename_prefix else "") + self.vocab_files_names["vocab_file"]
        out = os.path.join(save_directory, name)
        with open(out, "w", encoding="utf-8") as f:
            json.dump(self.vocab, f, ensure_ascii=False, indent=0)
        return (out,)


class ThaiWordsNewmmTokenizer(ThaiWordsTokenizer):
    """Words cut by newmm over PyThaiNLP's Thai word dictionary (`--tokenizer_type newmm`)."""

    vocab_files_names = {"vocab_file": "newmm.json"}
    kind = "newmm"


class ThaiWordsSyllableTokenizer(ThaiWordsTokenizer):
    """Thai syllables cut by newmm over PyThaiNLP's syllable dictionary (`--tokenizer_type syllable`)."""

    vocab_files_names = {"vocab_file": "syllable.json"}
    kind = "syllable"


class FakeSefrCutTokenizer(ThaiWordsTokenizer):
    """Text segmented offline (e.g. by SEFR CUT), words separated by `<|>` (`--tokenizer_type sefr_cut`)."""

    vocab_files_names = {"vocab_file": "fake_sefr_cut.json"}
    kind = "sefr_cut"

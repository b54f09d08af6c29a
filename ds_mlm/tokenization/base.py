"""What every ds-mlm tokenizer shares: RoBERTa special tokens and layout, the space token, and a fast batch encode.

A subclass supplies the vocabulary (`get_vocab`, `vocab_size`, `_convert_token_to_id`, `_convert_id_to_token`),
`_tokenize(text)` for a chunk of text that holds no added token, and `_encode_chunks(chunks)` that gives the ids of
many such chunks at once. This module is self-contained (it imports nothing from ds_mlm) so that a saved tokenizer
directory can carry it for `trust_remote_code=True` loading.

Encoding, in transformers' order: `prepare_for_tokenization` (spaces -> `<_>` with `add_space_token`), a split on
the added tokens (`<s> <pad> </s> <unk> <mask> <_>` ...), then `_tokenize` on the text between them.
"""

import re

from transformers import AddedToken, PreTrainedTokenizer

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")  # ids 0-4: what the RoBERTa config expects
SPACE_TOKEN = "<_>"  # the ancestor's token for a space


class RobertaLayoutTokenizer(PreTrainedTokenizer):
    """A slow (Python) tokenizer with the RoBERTa/CamemBERT layout: `<s> X </s>`, `<s> A </s></s> B </s>`,
    token type ids all zero. `add_space_token=True` maps every space to `<_>` (added to the vocabulary when
    missing), so decoding restores the spaces; it is saved in tokenizer_config.json and kept on reload."""

    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, add_space_token: bool = False, **kwargs):
        self.add_space_token = add_space_token
        for name, token in zip(("bos", "pad", "eos", "unk", "mask"), SPECIAL_TOKENS):
            kwargs.setdefault(f"{name}_token", token)
        kwargs.setdefault("cls_token", "<s>")
        kwargs.setdefault("sep_token", "</s>")
        kwargs.setdefault("model_max_length", 512)  # RoBERTa's 514 positions, less the two its pad offset takes
        kwargs.setdefault("clean_up_tokenization_spaces", False)  # decoding gives the text back, spaces as they were
        super().__init__(special_tokens_pattern="cls_double_sep", token_type_ids_pattern="all_zeros",
                         add_space_token=add_space_token, **kwargs)  # kept in init_kwargs: saved and reloaded
        if add_space_token:
            # Not special: it survives decode(skip_special_tokens=True) and can be masked like any other token.
            self.add_tokens([AddedToken(SPACE_TOKEN, normalized=False, special=False)])

    # -- encoding ---------------------------------------------------------------------------------------------------

    def prepare_for_tokenization(self, text, is_split_into_words=False, **kwargs):
        if self.add_space_token:
            text = text.replace(" ", SPACE_TOKEN)
        return text, kwargs

    def _added_token_pattern(self) -> re.Pattern:
        # Longest first: the same leftmost-longest split as transformers' Trie over the added tokens.
        tokens = sorted(self._added_tokens_encoder, key=len, reverse=True)
        return re.compile("(" + "|".join(map(re.escape, tokens)) + ")")

    def batch_encode_ids(self, lines: list[str]) -> list[list[int]]:
        """The ids of each line without special tokens around it: exactly
        `self(lines, add_special_tokens=False)["input_ids"]`, with the chunks of all lines encoded in one batch."""
        pattern = self._added_token_pattern()
        added = self._added_tokens_encoder
        layouts, chunks = [], []  # per line: ids of added tokens, or None where the next chunk's ids go
        for line in lines:
            text, _ = self.prepare_for_tokenization(line)
            layout = []
            for part in pattern.split(text):
                if part in added:
                    layout.append(added[part])
                elif part:
                    layout.append(None)
                    chunks.append(part)
            layouts.append(layout)
        encoded = iter(self._encode_chunks(chunks))
        out = []
        for layout in layouts:
            ids = []
            for item in layout:
                if item is None:
                    ids.extend(next(encoded))
                else:
                    ids.append(item)
            out.append(ids)
        return out

    def _encode_chunks(self, chunks: list[str]) -> list[list[int]]:
        """Ids of text chunks holding no added token; subclasses batch this (the generic path is per chunk)."""
        return [self.convert_tokens_to_ids(self._tokenize(chunk)) for chunk in chunks]

    # -- decoding ---------------------------------------------------------------------------------------------------

    def _join_pieces(self, pieces: list[str]) -> str:
        """Text of consecutive vocabulary pieces (no added token among them)."""
        return "".join(pieces)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        out, run = [], []
        for token in tokens:
            if token in self._added_tokens_encoder:
                out.append(self._join_pieces(run))
                run = []
                out.append(" " if token == SPACE_TOKEN else token)
            else:
                run.append(token)
        out.append(self._join_pieces(run))
        return "".join(out)

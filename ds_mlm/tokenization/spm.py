"""`ThaiRobertaTokenizer` (`--tokenizer_type spm`): a SentencePiece model stored as `sentencepiece.bpe.model`.

Spaces: with `add_space_token` every space becomes `<_>` before SentencePiece sees the text (the ancestor's
behaviour), and a lone `▁` piece, which then can only mark a line break (the concat dataset's separator), decodes to
`\\n`. A model that has a `<_>` piece (every model ds-mlm-train-tokenizer writes: it trains on text whose spaces are
`<_>`, as the ancestor's preprocessing did) always works this way. Without the flag, a model without `<_>` (a foreign
one) handles spaces itself: SentencePiece's `▁` is a space, and decoding restores them.

Ids: a model written by ds-mlm-train-tokenizer has `<s> <pad> </s> <unk> <mask>` as its pieces 0-4 and its ids are
used as they are. Any other model (e.g. an ancestor's, trained with SentencePiece's defaults) is shifted by five,
CamemBERT-style: ids 0-4 are the specials and piece i has id i + 5; its own control pieces are renamed `...NOTUSED`
so that the vocabulary has no hole.
"""

import os

import numpy as np
import sentencepiece as spm

from .base import SPACE_TOKEN, SPECIAL_TOKENS, RobertaLayoutTokenizer

SPIECE_UNDERLINE = "▁"


class ThaiRobertaTokenizer(RobertaLayoutTokenizer):
    """SentencePiece subwords with the RoBERTa layout; see the module docstring for spaces and ids."""

    vocab_files_names = {"vocab_file": "sentencepiece.bpe.model"}

    def __init__(self, vocab_file: str, add_space_token: bool = False, **kwargs):
        self.vocab_file = vocab_file
        with open(vocab_file, "rb") as f:
            self._load(f.read())
        has_space_piece = not self.sp_model.is_unknown(self.sp_model.piece_to_id(SPACE_TOKEN))
        super().__init__(add_space_token=add_space_token or has_space_piece, **kwargs)

    def _load(self, model_proto: bytes):
        self.sp_model = spm.SentencePieceProcessor(model_proto=model_proto)
        own_layout = [self.sp_model.id_to_piece(i) for i in range(min(5, len(self.sp_model)))] == list(SPECIAL_TOKENS)
        self.offset = 0 if own_layout else len(SPECIAL_TOKENS)

    # The SentencePiece processor is a C++ object: pickle the model itself (a worker may not see vocab_file).
    def __getstate__(self):
        return {**self.__dict__, "sp_model": self.sp_model.serialized_model_proto()}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._load(state["sp_model"])

    # -- vocabulary -------------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self.sp_model) + self.offset

    def _piece_name(self, i: int) -> str:
        piece = self.sp_model.id_to_piece(i)
        if self.offset and (self.sp_model.is_control(i) or self.sp_model.is_unknown(i) or piece in SPECIAL_TOKENS):
            return piece + "NOTUSED"  # shifted model: its own <unk>/<s>/</s> would clash with ids 0-4
        return piece

    def get_vocab(self) -> dict[str, int]:
        vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)} if self.offset else {}
        vocab.update((self._piece_name(i), i + self.offset) for i in range(len(self.sp_model)))
        vocab.update(self._added_tokens_encoder)
        return vocab

    def _convert_token_to_id(self, token: str) -> int:
        if self.offset and token in SPECIAL_TOKENS:
            return SPECIAL_TOKENS.index(token)
        i = self.sp_model.piece_to_id(token)
        return self.unk_token_id if self.sp_model.is_unknown(i) else i + self.offset

    def _convert_id_to_token(self, index: int) -> str:
        if index < self.offset:
            return SPECIAL_TOKENS[index]
        return self._piece_name(index - self.offset)

    # -- encoding ---------------------------------------------------------------------------------------------------

    def _tokenize(self, text: str) -> list[str]:
        return self.sp_model.encode(text, out_type=str)

    def _encode_chunks(self, chunks: list[str]) -> list[list[int]]:
        # One C++ call for the whole batch; one thread, since the data pipeline already runs a process per core.
        encoded = self.sp_model.encode(chunks, num_threads=1)
        if not self.offset:
            return encoded
        unk = self.sp_model.unk_id()
        return [np.where(np.asarray(ids) == unk, self.unk_token_id, np.asarray(ids) + self.offset).tolist()
                for ids in encoded]

    # -- decoding ---------------------------------------------------------------------------------------------------

    def _join_pieces(self, pieces: list[str]) -> str:
        if not self.add_space_token:
            return self.sp_model.decode_pieces(pieces)
        # Spaces are <_> here, so a lone ▁ can only be a line break (the ancestor's sentence separator).
        out, run = [], []
        for piece in pieces:
            if piece == SPIECE_UNDERLINE:
                out += [self.sp_model.decode_pieces(run), "\n"]
                run = []
            else:
                run.append(piece)
        out.append(self.sp_model.decode_pieces(run))
        return "".join(out)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        name = (filename_prefix + "-" if filename_prefix else "") + self.vocab_files_names["vocab_file"]
        out = os.path.join(save_directory, name)
        with open(out, "wb") as f:  # the loaded model, whatever became of vocab_file since
            f.write(self.sp_model.serialized_model_proto())
        return (out,)

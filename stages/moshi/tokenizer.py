"""Text tokens as words: a sentencepiece model (Kyutai ships `tokenizer_spm_32k_3.model`).

Padding tokens (the model's "nothing said now") and ids the tokenizer does not know show as None.
"""

from __future__ import annotations

from pathlib import Path

from rtpipe.stages.errors import ConfigError

WORD_START = "\u2581"  # sentencepiece's mark for "a new word starts here"


class TextTokenizer:
    """Maps the LM's text token ids to text pieces; `padding_ids` map to None."""

    def __init__(self, path: str | Path, padding_ids: tuple[int, ...] = (0, 3)):
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"tokenizer = {str(path)!r}: no such file")
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            ok = self._sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise ConfigError(f"tokenizer = {str(path)!r}: not a sentencepiece model ({e})") from None
        if not ok:
            raise ConfigError(f"tokenizer = {str(path)!r}: not a sentencepiece model")
        self.path = path
        self.vocab_size = self._sp.GetPieceSize()
        self.padding_ids = padding_ids

    def piece(self, token: int) -> str | None:
        """The text of one token, a leading space where a word starts; None for padding or unknown ids."""
        if token in self.padding_ids or not 0 <= token < self.vocab_size:
            return None
        if self._sp.IsControl(token) or self._sp.IsUnknown(token):
            return None
        return self._sp.IdToPiece(token).replace(WORD_START, " ")

    def encode(self, text: str) -> list[int]:
        return list(self._sp.EncodeAsIds(text))

    def decode(self, tokens: list[int]) -> str:
        return self._sp.DecodeIds([t for t in tokens if t not in self.padding_ids and 0 <= t < self.vocab_size])

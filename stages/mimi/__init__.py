"""Mimi, Kyutai's streaming speech codec, written here: model code and the mimi.encode/decode stages."""

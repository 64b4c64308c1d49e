"""The Moshi language model (temporal + depth transformer) and its `moshi.step` stage.

config.py (architecture), transformer.py and lm.py (modules in Kyutai's key layout), streaming.py (the
fast one-step-per-frame engine with its KV caches), sampling.py, checkpoint.py, tokenizer.py, stage.py.
"""

"""Lock-free single-producer/single-consumer rings in shared memory.

Knows nothing of audio, stages or the supervisor: numpy and the standard library only.
"""

"""Only the C part of the build; everything else is in pyproject.toml.

shm/_futex.c is optional: without a C compiler the package still installs, and shm/wakeup.py makes the
same futex calls through ctypes (slower on a cold cache, see shm/_futex.c).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("rtpipe.shm._futex", sources=["shm/_futex.c"], optional=True)])

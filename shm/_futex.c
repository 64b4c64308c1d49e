/* shm._futex: the three calls a ring makes on every frame, as plain C functions.
 *
 * shm/wakeup.py uses this module when it was built (pip builds it with the package) and falls back to
 * ctypes otherwise. Why it exists: after the 80 ms between two frames a stage's caches are cold, and a
 * ctypes call (argument conversion, libffi) then costs tens of microseconds where this costs a few; the
 * rings make one or two such calls on every hop (rtpipe bench pipeline, README.md).
 *
 *   wait(address, expected, timeout_ns)  FUTEX_WAIT on the shared 32-bit word at `address` while it
 *                                        equals `expected`, at most timeout_ns; the GIL is released
 *   wake(address, count) -> int          FUTEX_WAKE up to `count` waiters; how many were woken
 *   fence()                              a full memory barrier (sequentially consistent)
 *
 * Shared futexes (no FUTEX_PRIVATE_FLAG): the word lives in a segment that other processes map.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <linux/futex.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* The word at args[0], once the call has `wanted` arguments; NULL with an exception set otherwise. */
static uint32_t *word_arg(const char *name, PyObject *const *args, Py_ssize_t nargs, Py_ssize_t wanted) {
    if (nargs != wanted) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments (%zd given)", name, wanted, nargs);
        return NULL;
    }
    unsigned long long value = PyLong_AsUnsignedLongLong(args[0]);
    if (value == (unsigned long long)-1 && PyErr_Occurred()) {
        return NULL;
    }
    if (value % 4) {
        PyErr_Format(PyExc_ValueError, "futex word at %#llx is not 4-byte aligned", value);
        return NULL;
    }
    return (uint32_t *)(uintptr_t)value;
}

static PyObject *futex_wait(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    uint32_t *word = word_arg("wait", args, nargs, 3);
    if (word == NULL) {
        return NULL;
    }
    uint32_t expected = (uint32_t)PyLong_AsUnsignedLongLongMask(args[1]);
    long long timeout_ns = PyLong_AsLongLong(args[2]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    if (timeout_ns <= 0) {
        Py_RETURN_NONE;
    }
    struct timespec timeout = {(time_t)(timeout_ns / 1000000000LL), (long)(timeout_ns % 1000000000LL)};
    long result;
    int error;
    Py_BEGIN_ALLOW_THREADS
    result = syscall(SYS_futex, word, FUTEX_WAIT, expected, &timeout, NULL, 0);
    error = errno;
    Py_END_ALLOW_THREADS
    /* woken, timed out, the word already differed, or a signal: the caller re-reads its counter */
    if (result < 0 && error != EAGAIN && error != ETIMEDOUT && error != EINTR) {
        errno = error;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyObject *futex_wake(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    uint32_t *word = word_arg("wake", args, nargs, 2);
    if (word == NULL) {
        return NULL;
    }
    long count = PyLong_AsLong(args[1]);
    if (count == -1 && PyErr_Occurred()) {
        return NULL;
    }
    long woken = syscall(SYS_futex, word, FUTEX_WAKE, (int)count, NULL, NULL, 0);
    if (woken < 0) {
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLong(woken);
}

static PyObject *memory_fence(PyObject *module, PyObject *unused) {
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"wait", (PyCFunction)(void (*)(void))futex_wait, METH_FASTCALL,
     "wait(address, expected, timeout_ns): sleep while the u32 at address equals expected"},
    {"wake", (PyCFunction)(void (*)(void))futex_wake, METH_FASTCALL,
     "wake(address, count) -> int: wake up to count sleepers on the u32 at address"},
    {"fence", memory_fence, METH_NOARGS, "fence(): a full memory barrier"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "shm._futex", "Futex wait/wake and a memory fence for shm/wakeup.py.", -1,
    methods,
};

PyMODINIT_FUNC PyInit__futex(void) { return PyModule_Create(&module); }

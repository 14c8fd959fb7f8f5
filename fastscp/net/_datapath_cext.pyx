# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled receive loop of the data transfer phase: the twin of ``fastscp/net/_datapath_py.py``.

The loop runs without the GIL from one event to the next: ``recv`` into the
:class:`~fastscp.net.pdu.PDUStream`'s buffer (``poll`` only when the socket
has nothing), the PDU and PDV headers, each data set piece ``write`` to the
temp file and hashed with BLAKE3 (cext/blake3) while it is still in the cache.
Other associations' threads in the worker run meanwhile. The events, the
errors and their texts are the twin's (built by its helpers).

Only a plain TCP socket: a TLS association runs the twin (its bytes come
through the ``ssl`` module).

PERF: syscalls per 512x512 CT image in the worker (strace -c, 100 images,
one storescu association): 42.2 against 45.7 for the Python reader it
replaced and 50.7 for the twin: no ``ioctl`` for a narrowed socket timeout
(2 per image before), ``poll`` 4.2 instead of 6.3; ``futex`` (the GIL
hand-overs) 6.8-11.6 from run to run against 7.1.
"""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.exc cimport PyErr_CheckSignals
from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdint cimport int64_t, uint32_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memmove

from os import strerror

from fastscp.dicom.part10 import BLAKE3_PREFIX
from fastscp.net import _datapath_py as _py
from fastscp.net.pdu import DeadlineExceeded, PeerClosed


cdef extern from "<unistd.h>" nogil:
    ssize_t write(int fd, const void* buf, size_t count)

cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void* iov_base
        size_t iov_len
    ssize_t writev(int fd, const iovec* iov, int iovcnt)

cdef extern from "<sys/socket.h>" nogil:
    ssize_t recv(int fd, void* buf, size_t n, int flags)
    int setsockopt(int fd, int level, int name, const void* value, unsigned int length)
    enum: MSG_DONTWAIT

cdef extern from "<netinet/in.h>" nogil:
    enum: IPPROTO_TCP

cdef extern from "<netinet/tcp.h>" nogil:
    enum: TCP_QUICKACK

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd* fds, unsigned long nfds, int timeout)
    enum: POLLIN

cdef extern from "<time.h>" nogil:
    struct timespec:
        long tv_sec
        long tv_nsec
    int clock_gettime(int clock, timespec* now)
    enum: CLOCK_MONOTONIC

cdef extern from "blake3.h" nogil:
    # BLAKE3's C implementation (cext/blake3): the content hash, as the blake3 package computes it.
    ctypedef struct blake3_hasher:
        pass
    void blake3_hasher_init(blake3_hasher* hasher)
    void blake3_hasher_update(blake3_hasher* hasher, const void* data, size_t length)
    void blake3_hasher_finalize(const blake3_hasher* hasher, unsigned char* out, size_t length)
    enum: BLAKE3_OUT_LEN


# The twin's events (fastscp.net._datapath_py), repeated for C; checked at import below.
cdef enum:
    COMMAND = 1
    FRAGMENT = 2
    DATA_SET = 3
    WRITE_FAILED = 4
    OTHER_PDU = 5
    PROGRESS = 6
    # What the nogil loop stops for besides an event: raised under the GIL.
    STOP_CLOSED = 101
    STOP_IDLE = 102
    STOP_DEADLINE = 103
    STOP_OS_ERROR = 104
    STOP_PDU_TOO_LONG = 105
    STOP_TRUNCATED_PDV = 106
    STOP_PDV_LENGTH = 107
    STOP_COMMAND_LIMIT = 108
    STOP_DATA_SET_LIMIT = 109
    STOP_SIGNAL = 110
    P_DATA_TF = 0x04

for _name, _value in (("COMMAND", COMMAND), ("FRAGMENT", FRAGMENT), ("DATA_SET", DATA_SET),
                      ("WRITE_FAILED", WRITE_FAILED), ("OTHER_PDU", OTHER_PDU), ("PROGRESS", PROGRESS),
                      ("P_DATA_TF", P_DATA_TF)):
    assert getattr(_py, _name) == _value, _name


cdef inline uint32_t _be32(const unsigned char* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | <uint32_t>p[3]


cdef inline double _now() noexcept nogil:
    cdef timespec t
    clock_gettime(CLOCK_MONOTONIC, &t)
    return t.tv_sec + t.tv_nsec * 1e-9


cdef class DataPath:
    """The receive loop of one association's data transfer phase; see :class:`fastscp.net._datapath_py.DataPath`."""

    cdef readonly object stream
    cdef readonly Py_ssize_t max_command_set
    cdef readonly int context_id
    cdef readonly bint last
    cdef readonly int64_t length
    cdef readonly str content_hash
    cdef int _errno
    cdef readonly bytes command
    cdef object _fragment
    cdef int _pending
    # The buffer (the stream's bytearray, fetched at each pump) and its cursor.
    cdef unsigned char* _buf
    cdef Py_ssize_t _cap, _start, _end
    cdef int _sock
    cdef bint _quickack
    cdef int64_t _bytes_read
    # The deadline clock (PDUStream.deadline), read at each pump.
    cdef bint _clock
    cdef double _t0, _grace, _rate, _idle
    cdef int64_t _b0
    cdef int64_t _max_pdu
    # P-DATA-TF parsing state.
    cdef int64_t _pdu_left, _pdv_left
    cdef int _control
    cdef unsigned char* _command
    cdef Py_ssize_t _command_length
    # The data set going to a file.
    cdef bint _file
    cdef int _fd
    cdef int64_t _limit, _reported
    cdef object _prefix
    cdef unsigned char* _prefix_buf
    cdef Py_ssize_t _prefix_room, _prefix_length
    cdef blake3_hasher _hash
    cdef bint _hashing
    # What goes before the data set (the File Meta), with its first piece: the bytes and what is left.
    cdef bytes _head_object
    cdef const unsigned char* _head
    cdef Py_ssize_t _head_length
    # What stopped the loop.
    cdef Py_ssize_t _piece_start, _piece_length
    cdef int64_t _detail

    def __cinit__(self, stream, Py_ssize_t max_command_set):
        self._command = <unsigned char*>malloc(max_command_set if max_command_set > 0 else 1)
        if self._command == NULL:
            raise MemoryError()

    def __init__(self, stream, Py_ssize_t max_command_set):
        self.stream = stream
        self.max_command_set = max_command_set
        self.command = b""
        self.content_hash = ""
        self._fragment = memoryview(b"")
        self._pdv_left = -1
        self._fd = -1
        self._prefix = bytearray()

    def __dealloc__(self):
        free(self._command)

    @property
    def errno(self):
        """WRITE_FAILED: why."""
        return self._errno

    @property
    def fragment(self):
        """FRAGMENT: the piece (a view into the receive buffer, valid until the next pump())."""
        return self._fragment

    def to_file(self, int fd, int64_t limit, bytearray prefix, Py_ssize_t prefix_room, bint hash=True,
                bytes head not None=b""):
        """See :meth:`fastscp.net._datapath_py.DataPath.to_file`."""
        self._head_object = head  # kept alive while the loop writes from it
        self._head = <const unsigned char*>PyBytes_AS_STRING(head)
        self._head_length = PyBytes_GET_SIZE(head)
        if hash:
            blake3_hasher_init(&self._hash)
        self._hashing = hash
        self._file = True
        self._fd = fd
        self._limit = limit
        # The prefix is filled in place without the GIL, then cut to its length.
        self._prefix_length = PyByteArray_GET_SIZE(prefix)
        PyByteArray_Resize(prefix, self._prefix_length + prefix_room)
        self._prefix = prefix
        self._prefix_room = prefix_room + self._prefix_length
        self.length = 0
        self._reported = 0
        self.content_hash = ""

    def pump(self):
        """See :meth:`fastscp.net._datapath_py.DataPath.pump`."""
        cdef int stop
        if self._pending:
            stop, self._pending = self._pending, 0
            return stop
        s = self.stream
        if s.rest:
            self._pdu_left, s.rest = s.rest, 0
        self._buf = <unsigned char*>PyByteArray_AS_STRING(s._buf)
        self._cap = PyByteArray_GET_SIZE(s._buf)
        self._start, self._end = s._start, s._end
        self._bytes_read = s.bytes_read
        self._sock = s.sock.fileno()
        self._quickack = s._quickack
        self._max_pdu = s.limit
        self._clock = s._clock
        if self._clock:
            self._t0, self._grace, self._rate, self._b0 = s._t0, s._grace, s._rate, s._b0
        idle = s._idle_timeout
        self._idle = -1.0 if idle is None else idle
        if self._file:
            self._prefix_buf = <unsigned char*>PyByteArray_AS_STRING(self._prefix)
        try:
            while True:
                with nogil:
                    stop = self._run()
                if stop != STOP_SIGNAL:
                    break
                PyErr_CheckSignals()  # a handler that raises ends the association
        finally:
            s._start, s._end = self._start, self._end
            s.bytes_read = self._bytes_read
        return self._event(stop)

    cdef object _event(self, int stop):
        """The event under the GIL: Python objects made, errors raised with the twin's texts."""
        if stop == COMMAND:
            self.command = PyBytes_FromStringAndSize(<char*>self._command, self._command_length)
            self._command_length = 0
            return self._end_message(stop)
        if stop == FRAGMENT:
            self._fragment = self.stream._view[self._piece_start : self._piece_start + self._piece_length]
            return self._end_message(stop) if self.last else stop
        if stop == DATA_SET or stop == WRITE_FAILED:
            if not self._file:
                # The data set's last piece: the hash, the prefix cut to length.
                self._finish_file()
                if stop == WRITE_FAILED:
                    self._pending = self._end_message(DATA_SET)
                    return stop
                return self._end_message(stop)
            return stop
        if stop == OTHER_PDU or stop == PROGRESS:
            return stop
        if stop == STOP_CLOSED:
            raise PeerClosed("connection closed by peer")
        if stop == STOP_IDLE:
            raise TimeoutError("timed out")
        if stop == STOP_DEADLINE:
            raise DeadlineExceeded(self.stream._why or "deadline passed")
        if stop == STOP_OS_ERROR:
            raise OSError(<int>self._detail, strerror(<int>self._detail))
        if stop == STOP_PDU_TOO_LONG:
            raise _py.pdu_too_long(self._detail, self.stream.limit)
        if stop == STOP_TRUNCATED_PDV:
            raise _py.truncated_pdv()
        if stop == STOP_PDV_LENGTH:
            raise _py.pdv_does_not_fit(self._detail)
        if stop == STOP_COMMAND_LIMIT:
            raise _py.command_too_long(self.max_command_set)
        if stop == STOP_DATA_SET_LIMIT:
            raise _py.data_set_too_large(self._limit)
        raise AssertionError(f"unknown stop {stop}")

    cdef int _end_message(self, int event) except -1:
        self.stream.rest, self._pdu_left = self._pdu_left, 0
        return event

    cdef int _finish_file(self) except -1:
        cdef unsigned char digest[BLAKE3_OUT_LEN]
        if self._hashing:
            blake3_hasher_finalize(&self._hash, digest, BLAKE3_OUT_LEN)
            self.content_hash = BLAKE3_PREFIX + (<bytes>PyBytes_FromStringAndSize(<char*>digest, BLAKE3_OUT_LEN)).hex()
        PyByteArray_Resize(self._prefix, self._prefix_length)
        self._prefix = bytearray()
        self._prefix_buf = NULL
        self._head_object = None
        self._head_length = 0
        return 0

    cdef int _run(self) noexcept nogil:
        """From the buffer's cursor to the next event or stop (no GIL)."""
        cdef const unsigned char* p
        cdef int64_t n, item_length, room
        cdef ssize_t written
        cdef iovec chunks[2]
        cdef bint done, last
        cdef int stop
        while True:
            if self._pdv_left < 0:
                # Between PDVs (or PDUs): the next header.
                if self._pdu_left == 0:
                    if self._end - self._start < 6:
                        stop = self._refill(6)
                        if stop:
                            return stop
                    p = self._buf + self._start
                    if p[0] != P_DATA_TF:
                        return OTHER_PDU
                    n = _be32(p + 2)
                    if n > self._max_pdu:
                        self._detail = n
                        return STOP_PDU_TOO_LONG
                    self._start += 6
                    self._pdu_left = n
                    continue
                if self._pdu_left < 6:
                    return STOP_TRUNCATED_PDV
                if self._end - self._start < 6:
                    stop = self._refill(6)
                    if stop:
                        return stop
                p = self._buf + self._start
                item_length = _be32(p)
                if item_length < 2 or 4 + item_length > self._pdu_left:
                    self._detail = item_length
                    return STOP_PDV_LENGTH
                self._start += 6
                self._pdu_left -= 6
                self._pdv_left = item_length - 2
                self._control = p[5]
                if self._control & 1:
                    self.context_id = p[4]
                if self._pdv_left:
                    continue
                n = 0  # an empty value is a (last) fragment too
            else:
                if self._start == self._end:
                    stop = self._refill(1)
                    if stop:
                        return stop
                n = self._end - self._start
                if n > self._pdv_left:
                    n = self._pdv_left
            p = self._buf + self._start
            self._start += n
            self._pdu_left -= n
            self._pdv_left -= n
            done = self._pdv_left == 0
            last = done and (self._control & 2) != 0
            if done:
                self._pdv_left = -1
            # Message Control Header (PS3.8 E.2): bit 0 command, bit 1 last fragment.
            if self._control & 1:
                if self._command_length + n > self.max_command_set:
                    return STOP_COMMAND_LIMIT
                memcpy(self._command + self._command_length, p, n)
                self._command_length += n
                if last:
                    return COMMAND
                continue
            if not self._file:
                self._piece_start = self._start - n
                self._piece_length = n
                self.last = last
                return FRAGMENT
            self.length += n
            if self.length > self._limit:
                return STOP_DATA_SET_LIMIT
            room = self._prefix_room - self._prefix_length
            if room > 0:
                if room > n:
                    room = n
                memcpy(self._prefix_buf + self._prefix_length, p, room)
                self._prefix_length += room
            if last:
                self._file = False
            if self._fd >= 0:
                if self._hashing:
                    blake3_hasher_update(&self._hash, p, n)
                while n > 0 or self._head_length > 0:
                    if self._head_length > 0:
                        # The File Meta and the first piece in one system call (PERF: a write less per store).
                        chunks[0].iov_base = <void*>self._head
                        chunks[0].iov_len = self._head_length
                        chunks[1].iov_base = <void*>p
                        chunks[1].iov_len = n
                        written = writev(self._fd, chunks, 2)
                    else:
                        written = write(self._fd, p, n)
                    if written < 0:
                        if errno == EINTR:
                            continue
                        self._errno = errno
                        self._fd = -1
                        return WRITE_FAILED
                    if self._head_length > 0:
                        if written < self._head_length:  # partial: only on a full disk
                            self._head += written
                            self._head_length -= written
                            continue
                        written -= self._head_length
                        self._head_length = 0
                    p += written
                    n -= written
            if last:
                return DATA_SET

    cdef inline double _remaining(self) noexcept nogil:
        """Seconds left before the deadline (PDUStream._arm's arithmetic)."""
        cdef double allowed = self._grace
        if self._rate > 0:
            allowed += (self._bytes_read - self._b0) / self._rate
        return self._t0 + allowed - _now()

    cdef int _refill(self, Py_ssize_t needed) noexcept nogil:
        """At least ``needed`` bytes (1 or 6) from the buffer's start: compact, then receive."""
        cdef Py_ssize_t tail
        cdef ssize_t got
        cdef pollfd waiting
        cdef double remaining, timeout
        cdef int one = 1, ready
        while self._end - self._start < needed:
            if self._start == self._end:
                self._start = self._end = 0
            elif self._start + needed > self._cap:
                tail = self._end - self._start
                memmove(self._buf, self._buf + self._start, tail)
                self._start, self._end = 0, tail
            if self._clock and self._remaining() <= 0:
                return STOP_DEADLINE
            # PERF: recv first, poll only when the socket has nothing (CPython
            # polls before every recv of a socket with a timeout).
            got = recv(self._sock, self._buf + self._end, self._cap - self._end, MSG_DONTWAIT)
            if got < 0:
                if errno == EINTR:
                    return STOP_SIGNAL
                if errno != EAGAIN:  # EWOULDBLOCK is EAGAIN on Linux
                    self._detail = errno
                    return STOP_OS_ERROR
                if self._file and self.length > self._reported:
                    # About to wait for the peer: the association's counters first.
                    self._reported = self.length
                    return PROGRESS
                timeout = self._idle
                if self._clock:
                    remaining = self._remaining()
                    if remaining <= 0:
                        return STOP_DEADLINE
                    if timeout < 0 or remaining < timeout:
                        timeout = remaining
                if timeout > 2000000.0:
                    timeout = 2000000.0  # poll takes an int of milliseconds
                waiting.fd = self._sock
                waiting.events = POLLIN
                waiting.revents = 0
                ready = poll(&waiting, 1, -1 if timeout < 0 else <int>(timeout * 1000.0 + 0.999))
                if ready < 0:
                    if errno == EINTR:
                        return STOP_SIGNAL
                    self._detail = errno
                    return STOP_OS_ERROR
                if ready == 0:
                    if self._clock and (self._idle < 0 or timeout < self._idle):
                        return STOP_DEADLINE
                    return STOP_IDLE
                continue
            if got == 0:
                return STOP_CLOSED
            self._end += got
            self._bytes_read += got
            if self._quickack:
                # Linux leaves quick-ACK mode after a few segments; re-arm it
                # so a sender with Nagle on never waits for our delayed ACK.
                setsockopt(self._sock, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof(one))
        return 0

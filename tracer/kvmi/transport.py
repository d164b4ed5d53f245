"""Blocking transports around the sans-IO core: :class:`Listener` and :class:`Session`.

A KVMI host (QEMU, vmitrace's QEMU plugin, or a :class:`~tracer.kvmi.recording.ReplayHost`)
connects to the introspector's listening socket; one connection is one VM. Each
:class:`Session` demultiplexes the connection: replies wake the thread waiting for them, events
go to a queue read by :meth:`Session.next_event`. So one thread can run the event loop while
others issue commands, and events that arrive while a command waits are queued, never lost.

One thread at a time owns reading the socket. A thread waiting in ``next_event`` on an empty
queue reads and decodes itself, so a blocking event costs no thread hand-off; the session's
reader thread reads while nobody waits for events (or a command waits for its reply and no
``next_event`` is reading), and takes over when the event loop has been away for
``_IDLE_HANDOFF`` seconds (so the queue, back-pressure and EOF detection work without it).

Example::

    with Listener("unix:/run/vmitrace/kvmi.sock", secret=b"cookie") as lst:
        s = lst.accept(timeout=30)
        s.control_events(0, abi.KVMI_EVENT_CR, True)
        s.control_cr(0, 3, True)
        while (ev := s.next_event(timeout=1.0)) is not None or not s.closed:
            if ev is not None:
                print(ev.vcpu, hex(ev.arch.regs.rip))
                s.reply(ev)
"""
from __future__ import annotations

import collections
import grp
import logging
import os
import queue
import secrets as pysecrets
import select
import socket
import stat
import threading
import time
from collections import namedtuple
from typing import Any, Callable, Iterable, Mapping, Sequence

from . import abi
from .errors import (CommandError, CommandTimeout, ConnectionClosed, EventReplyError,
                     HandshakeError, KvmEOPNOTSUPP, KvmENOENT, KvmENOSYS, KvmEPERM, KvmiError,
                     MalformedMessage, ProtocolError, TruncatedMessage, command_error)
from .events import Event
from .protocol import CommandReply, Handshake, IntrospectorProtocol, encode_event_reply

log = logging.getLogger(__name__)

#: recorder(direction, monotonic_ns, raw_message_bytes); direction is "in" or "out".
Recorder = Callable[[str, int, bytes], None]
#: recorder_factory(handshake) -> Recorder or None (called once per accepted connection).
RecorderFactory = Callable[[Handshake], "Recorder | None"]

#: Decoded GET_REGISTERS reply: mode (2/4/8), regs, sregs, msrs {index: value}.
Registers = namedtuple("Registers", "mode regs sregs msrs")

_PAGE = 4096
_RECV_SIZE = 65536
_MAX_READ = 64 << 20  # largest read_physical/write_physical one call accepts
_MIN_EVENT_MESSAGE = abi.KVMI_MSG_HDR.size + abi.KVMI_EVENT_.size
#: seconds without a thread in next_event after which the reader thread reads again
_IDLE_HANDOFF = 0.02
DEFAULT_COMMAND_TIMEOUT = 10.0
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_REPLY_SPIN_US = 300


class _Waiter:
    __slots__ = ("done", "reply", "error", "msg_id", "on_success")

    def __init__(self, msg_id: int, on_success: Callable[[], None] | None) -> None:
        self.done = threading.Event()
        self.reply: CommandReply | None = None
        self.error: BaseException | None = None
        self.msg_id = msg_id
        self.on_success = on_success


class Session:
    """One host connection (one VM) after the handshake.

    ``recorder`` (optional) is called as ``recorder(direction, monotonic_ns, raw)`` for every
    message in both directions, handshake included; if it has a ``close()`` method, that is
    called when the session ends.

    Attributes: ``uuid`` (:class:`uuid.UUID`), ``name``, ``start_time`` (from the handshake),
    ``handshake``, ``closed``, ``error`` (the exception that closed it, or None),
    ``events_received``, ``dropped_events`` (non-blocking events dropped because the queue was
    full), ``blocking`` (False after a successful ``set_delivery(False)``).

    Event queue: at ``max_queued_events`` queued events the reader stops reading (the socket
    pushes back on the host) unless a command waits for its reply; then it reads on up to
    twice that many. Beyond that, non-blocking events are dropped and counted in
    ``dropped_events``; blocking ones close the session (a host cannot have that many vCPUs
    waiting).

    Commands raise :class:`~tracer.kvmi.errors.CommandError` subclasses for ``-KVM_E*``
    answers, :class:`CommandTimeout` after ``timeout`` seconds (default
    ``command_timeout``), :class:`ConnectionClosed` when the connection is gone.
    """

    def __init__(self, sock: socket.socket, protocol: IntrospectorProtocol, *,
                 recorder: Recorder | None = None, command_timeout: float = DEFAULT_COMMAND_TIMEOUT,
                 max_queued_events: int = 16384,
                 handshake_log: Sequence[tuple[str, int, bytes]] = (),
                 initial_messages: Sequence[Any] = ()) -> None:
        if protocol.handshake is None or protocol.state != "ready":
            raise ValueError("Session needs a protocol that completed the handshake")
        self.handshake: Handshake = protocol.handshake
        self.uuid = self.handshake.uuid
        self.name = self.handshake.name
        self.start_time = self.handshake.start_time
        self.command_timeout = command_timeout
        # Busy-poll this long for the next event before sleeping in poll(): while a guest
        # makes events densely, it saves the wake-up per event (tens of microseconds on a
        # loaded host) for the CPU time spent polling. 0: always sleep.
        self.spin_us = 0
        # After answering an event its vCPU waited for, busy-poll until this long after the
        # reply for the next event (0: never): a guest just released often makes its next
        # event within that time, and then the poll spares a thread wake-up on the critical
        # path of a guest that waits for every event. It costs at most that much CPU per
        # reply.
        self.reply_spin_us = DEFAULT_REPLY_SPIN_US
        self._reply_spin_until = 0.0
        self.blocking = True
        self.events_received = 0
        self.dropped_events = 0
        self.error: BaseException | None = None
        self._sock = sock
        self._proto = protocol
        self._recorder = recorder
        self._rec_lock = threading.Lock()
        # Sections enter the plain lock, and wait on or notify the condition built on it
        # (Condition's own __enter__/__exit__ are Python code, on the path of every event).
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._send_lock = threading.Lock()
        self._waiters: dict[int, _Waiter] = {}
        self._queue: collections.deque[Event] = collections.deque()
        self._soft_limit = max_queued_events
        self._hard_limit = 2 * max_queued_events
        self._outstanding: dict[int, Event] = {}
        self._closed = False
        # Reading ownership (under _lock): the thread reading the socket, the number of
        # threads in next_event, and when the last one left.
        self._read_owner: int | None = None  # thread ident
        self._consumers = 0
        self._consumer_left = time.monotonic()  # the reader thread starts after a pause
        # A consumer reads at most this much at once, so it never queues more than
        # max_queued_events (it reads only when the queue is empty).
        self._consumer_recv_size = min(_RECV_SIZE, max_queued_events * _MIN_EVENT_MESSAGE)
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)
        for direction, ts, raw in handshake_log:
            self._record(direction, raw, ts)
        for msg in initial_messages:  # events the host sent right behind its handshake
            self._record("in", msg.raw)
            self._dispatch_event(msg)
        sock.settimeout(None)
        self._reader = threading.Thread(target=self._read_loop, daemon=True,
                                        name=f"kvmi-reader-{self.name or self.uuid}")
        self._reader.start()

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_socket(cls, sock: socket.socket, *, secret: bytes | None = None,
                    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
                    recorder: Recorder | None = None,
                    recorder_factory: RecorderFactory | None = None, **kw: Any) -> "Session":
        """Run the introspector side of the handshake on a connected socket.

        Raises :class:`HandshakeError`/:class:`ProtocolError` (socket closed) on bad input,
        :class:`CommandTimeout` if the host does not complete it within ``handshake_timeout``.
        """
        proto = IntrospectorProtocol(secret=secret)
        deadline = time.monotonic() + handshake_timeout
        hs: Handshake | None = None
        try:
            while hs is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CommandTimeout("host did not send its handshake in time")
                sock.settimeout(left)
                try:
                    data = sock.recv(_RECV_SIZE)
                except socket.timeout:
                    raise CommandTimeout("host did not send its handshake in time") from None
                if not data:
                    proto.receive_eof()
                    raise HandshakeError("connection closed before the handshake")
                ts_in = time.monotonic_ns()
                msgs = proto.receive_data(data)
                if msgs:
                    hs, extra = msgs[0], msgs[1:]
            response = proto.handshake_response()
            sock.settimeout(handshake_timeout)
            sock.sendall(response)
            ts_out = time.monotonic_ns()
        except (KvmiError, OSError):
            _close_socket(sock)
            raise
        if recorder is None and recorder_factory is not None:
            recorder = recorder_factory(hs)
        return cls(sock, proto, recorder=recorder,
                   handshake_log=[("in", ts_in, hs.raw), ("out", ts_out, response)],
                   initial_messages=extra, **kw)

    # -- lifecycle ------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the connection; pending commands fail with :class:`ConnectionClosed`."""
        self._shutdown(None)
        if threading.current_thread() is not self._reader:
            self._reader.join(timeout=5)

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Session {self.name!r} {self.uuid} {state}>"

    def _shutdown(self, error: BaseException | None) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.error = error
            for w in self._waiters.values():
                w.error = error
                w.done.set()
            self._waiters.clear()
            self._cv.notify_all()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if error is not None:
            log.warning("kvmi session %s (%s) closed: %s", self.name, self.uuid, error)

    def _record(self, direction: str, raw: bytes, ts: int | None = None) -> None:
        if self._recorder is None:
            return
        with self._rec_lock:
            self._recorder(direction, time.monotonic_ns() if ts is None else ts, raw)

    # -- reading ------------------------------------------------------------------------
    def _read_loop(self) -> None:
        error: BaseException | None = None
        me = threading.get_ident()
        try:
            while self._take_reading(me):
                try:
                    try:
                        data = self._sock.recv(_RECV_SIZE)
                    except OSError as exc:
                        if self._closed:
                            break
                        raise ConnectionClosed("receive failed", exc) from None
                    self._receive(data, may_wait=True)
                finally:
                    self._release_reading(consumer=False)
        except (ProtocolError, ConnectionClosed) as exc:
            error = exc
        except Exception as exc:  # a bug or a recorder failure: close, don't hang callers
            log.exception("kvmi reader failed")
            error = exc
        self._shutdown(error)
        with self._lock:  # a consumer may still be reading: close the socket after it
            while self._read_owner is not None:
                self._cv.wait(_IDLE_HANDOFF)
        _close_socket(self._sock)
        close_recorder = getattr(self._recorder, "close", None)
        if close_recorder is not None:  # e.g. a RecordingWriter: flush it with the session
            with self._rec_lock:
                close_recorder()

    def _take_reading(self, me: int) -> bool:
        """Reader thread: wait until it should read, and own reading; False once closed."""
        with self._lock:
            while not self._closed:
                if self._read_owner is None and (self._waiters or (
                        self._consumers == 0
                        and time.monotonic() - self._consumer_left >= _IDLE_HANDOFF)):
                    self._read_owner = me
                    return True
                self._cv.wait(_IDLE_HANDOFF)  # consumers leaving next_event don't notify
            return False

    def _release_reading(self, consumer: bool) -> None:
        with self._lock:
            self._release_reading_locked(consumer)

    def _release_reading_locked(self, consumer: bool) -> None:
        self._read_owner = None
        # Wake who may read next: another next_event, or the reader thread for a waiting
        # command (not on every event: that would wake the reader each time).
        if self._consumers > consumer or self._waiters or self._closed:
            self._cv.notify_all()

    def _receive(self, data: bytes, may_wait: bool) -> None:
        """Decode and dispatch what the owner of reading received (b"": end of stream).

        Raises ProtocolError/ConnectionClosed for the session to close with. ``may_wait``:
        the reader thread may wait for queue space (back-pressure); a consumer never does.
        """
        if not data:
            with self._lock:
                if self._closed:
                    return
                self._proto.receive_eof()
            raise ConnectionClosed("host closed the connection")
        bad: ProtocolError | None = None
        with self._lock:
            try:
                msgs = self._proto.receive_data(data)
            except ProtocolError as exc:
                msgs, bad = exc.messages, exc
        for msg in msgs:  # valid messages before a bad one are still delivered
            self._record("in", msg.raw)
            if isinstance(msg, Event):
                self._dispatch_event(msg, may_wait)
            else:
                self._dispatch_reply(msg)
        if bad is not None:
            raise bad

    def _read_as_consumer(self, deadline: float | None) -> None:
        """next_event's thread owns reading: wait for data until ``deadline``, receive it."""
        try:
            spin_end = 0.0
            if self.spin_us:
                spin_end = time.monotonic() + self.spin_us / 1e6
            elif self._reply_spin_until:
                spin_end, self._reply_spin_until = self._reply_spin_until, 0.0
            # A busy-poll starts with poll(0): no recv that fails (an exception in Python)
            # before it, on the path of every event a vCPU waits for.
            recv, size = self._sock.recv, self._consumer_recv_size
            try:
                if spin_end and self._spin_for_input(spin_end, deadline):
                    data = recv(size, socket.MSG_DONTWAIT)
                else:
                    try:
                        data = recv(size, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        if deadline is None:
                            wait_ms = -1
                        else:
                            wait_ms = max(0, int((deadline - time.monotonic()) * 1000 + 0.999))
                        if not self._poll.poll(wait_ms):
                            return
                        data = recv(size, socket.MSG_DONTWAIT)
            except BlockingIOError:  # readiness that another reader's recv took
                return
            self._receive(data, may_wait=False)
        except OSError as exc:
            if not self._closed:
                self._shutdown(ConnectionClosed("receive failed", exc))
        except (ProtocolError, ConnectionClosed) as exc:
            self._shutdown(exc)
        except Exception as exc:  # a bug or a recorder failure: close, don't hang callers
            log.exception("kvmi reader failed")
            self._shutdown(exc)

    def _spin_for_input(self, end: float, deadline: float | None) -> bool:
        """Poll without sleeping until input arrives (True) or monotonic time `end` (or the
        deadline, if sooner) passes (False)."""
        poll, clock = self._poll.poll, time.monotonic
        if deadline is not None:
            end = min(end, deadline)
        while not poll(0):
            if clock() >= end:
                return False
        return True

    def _dispatch_reply(self, reply: CommandReply) -> None:
        with self._lock:
            waiter = self._waiters.pop(reply.seq, None)
            if waiter is None:
                return  # its command timed out meanwhile
            if reply.err == 0 and waiter.on_success is not None:
                waiter.on_success()  # runs before any later message is dispatched
            waiter.reply = reply
            waiter.done.set()

    def _dispatch_event(self, event: Event, may_wait: bool = True) -> None:
        with self._lock:
            if not self.blocking:
                event.blocking = False
            q = self._queue
            # Back-pressure: stop reading while the queue is full and nobody waits for a
            # reply (a waiting command must still get its reply, so then we read on).
            while (may_wait and len(q) >= self._soft_limit and not self._waiters
                   and not self._closed):
                self._cv.wait()
            if len(q) >= self._hard_limit:
                if not event.blocking:
                    self.dropped_events += 1
                    return
                raise MalformedMessage(f"more than {self._hard_limit} unanswered events queued")
            if event.blocking:
                if event.seq in self._outstanding:
                    raise MalformedMessage(f"event seq {event.seq} reused before its reply")
                self._outstanding[event.seq] = event
            self.events_received += 1
            q.append(event)
            if may_wait or self._consumers > 1:  # a consumer reading needs no wake-up
                self._cv.notify_all()

    # -- events ---------------------------------------------------------------------------
    def next_event(self, timeout: float | None = None) -> Event | None:
        """The next event in arrival order; None after ``timeout`` seconds without one.

        Raises :class:`ConnectionClosed` once the connection is closed and the queue is empty.
        """
        lock, cv, q = self._lock, self._cv, self._queue
        with lock:  # fast path: an event is already queued (one lock round trip)
            if q:
                self._consumer_left = time.monotonic()  # keeps the reader thread parked
                return self._pop_event()
            self._consumers += 1
        counted = True  # in self._consumers; a section that returns takes it out
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                with lock:
                    while True:
                        if q:
                            counted = False
                            self._leave_consumers()
                            return self._pop_event()
                        if self._closed:
                            raise ConnectionClosed("session closed", self.error)
                        if self._read_owner is None:
                            self._read_owner = threading.get_ident()
                            break
                        if deadline is None:
                            cv.wait()
                        else:
                            left = deadline - time.monotonic()
                            if left <= 0:
                                counted = False
                                self._leave_consumers()
                                return None
                            cv.wait(left)
                try:
                    self._read_as_consumer(deadline)
                except BaseException:  # it handles the rest itself
                    self._release_reading(consumer=True)
                    raise
                with lock:  # give up reading, and take what it queued
                    self._release_reading_locked(consumer=True)
                    if q:
                        counted = False
                        self._leave_consumers()
                        return self._pop_event()
                    if deadline is not None and time.monotonic() >= deadline:
                        counted = False
                        self._leave_consumers()
                        return None
        finally:
            if counted:
                with lock:
                    self._leave_consumers()

    def _pop_event(self) -> Event:
        """With the lock held: the first queued event."""
        event = self._queue.popleft()
        if len(self._queue) + 1 >= self._soft_limit:
            self._cv.notify_all()  # a reader held back by a full queue
        return event

    def _leave_consumers(self) -> None:
        """With the lock held: a thread leaves next_event."""
        self._consumers -= 1
        self._consumer_left = time.monotonic()

    def reply(self, event: Event, action: int = abi.KVMI_EVENT_ACTION_CONTINUE,
              **reply: Any) -> None:
        """Answer ``event`` exactly once (``action``: KVMI_EVENT_ACTION_CONTINUE/RETRY/CRASH).

        Event-specific reply fields: ``new_val`` for CR/MSR (default: the written value),
        ``kvmi_event_pf_reply`` fields for PF. Events delivered in non-blocking mode need no
        reply; replying to them sends nothing. A second reply raises :class:`EventReplyError`.
        """
        data = encode_event_reply(event, action, **reply)  # validates before state changes
        if not event.blocking:
            return
        with self._lock:
            if self._outstanding.get(event.seq) is not event:
                raise EventReplyError(f"{event.name} seq {event.seq} was already replied "
                                      "(or does not belong to this session)")
            del self._outstanding[event.seq]
        self._send(data)
        # the next read busy-polls until then (0.0: not after this reply)
        self._reply_spin_until = time.monotonic() + self.reply_spin_us / 1e6 \
            if self.reply_spin_us else 0.0

    def unanswered(self) -> list[Event]:
        """Blocking events received (queued or handed out) and not replied yet."""
        with self._lock:
            return list(self._outstanding.values())

    def pending_events(self) -> int:
        """Number of events queued and not yet returned by :meth:`next_event`."""
        with self._lock:
            return len(self._queue)

    # -- commands -------------------------------------------------------------------------
    def _send(self, data: bytes) -> None:
        with self._send_lock:
            if self._closed:
                raise ConnectionClosed("session closed", self.error)
            self._record("out", data)
            try:
                self._sock.sendall(data)
            except OSError as exc:
                self._shutdown(ConnectionClosed("send failed", exc))
                raise ConnectionClosed("send failed", exc) from None

    def request(self, msg_id: int, payload: bytes = b"", vcpu: int | None = None,
                timeout: float | None = None,
                _on_success: Callable[[], None] | None = None) -> bytes:
        """Send one command and wait for its reply; returns the data after kvmi_error_code.

        ``vcpu`` prepends ``kvmi_vcpu_hdr`` (required exactly for vCPU commands). This is the
        escape hatch for commands without a typed method (e.g. KVMI_CONTROL_VE).
        """
        name = abi.COMMAND_NAMES.get(msg_id, hex(msg_id))
        if msg_id == abi.KVMI_CONTROL_CMD_RESPONSE:
            raise ValueError("KVMI_CONTROL_CMD_RESPONSE would stop command replies; "
                             "Session needs one reply per command")
        with self._send_lock:
            with self._lock:
                if self._closed or self._proto.state != "ready":
                    raise ConnectionClosed("session closed", self.error)
                seq, data = self._proto.command(msg_id, payload, vcpu)
                waiter = _Waiter(msg_id, _on_success)
                self._waiters[seq] = waiter
                self._cv.notify_all()  # a reader held back by a full queue must read on
            self._record("out", data)
            try:
                self._sock.sendall(data)
            except OSError as exc:
                self._shutdown(ConnectionClosed("send failed", exc))
        wait = self.command_timeout if timeout is None else timeout
        if not waiter.done.wait(wait):
            with self._lock:  # the reader completes waiters under this lock: no lost reply
                if not waiter.done.is_set():
                    self._waiters.pop(seq, None)
                    self._proto.abandon(seq)
                    raise CommandTimeout(f"{name}: no reply within {wait} s")
        if waiter.reply is None:
            raise ConnectionClosed(f"{name}: session closed", waiter.error or self.error)
        if waiter.reply.err:
            raise command_error(waiter.reply.err, name)
        return waiter.reply.data

    def _call(self, msg_id: int, vcpu: int | None = None, timeout: float | None = None,
              tail: bytes = b"", **fields: Any) -> bytes:
        spec = abi.COMMANDS[msg_id]
        payload = spec.request.encode(fields) if spec.request is not None else b""
        return self.request(msg_id, payload + tail, vcpu, timeout)

    def _reply(self, msg_id: int, data: bytes) -> Any:
        spec = abi.COMMANDS[msg_id]
        assert spec.reply is not None
        try:
            return spec.reply.decode_exact(data)
        except abi.AbiError as exc:
            err = MalformedMessage(f"{spec.name} reply: {exc}")
        self._shutdown(err)
        raise err

    # -- the dialect's commands -----------------------------------------------------------
    def get_version(self, timeout: float | None = None) -> Any:
        """``kvmi_get_version_reply`` (version, features: spp/vmfunc/eptp/ve)."""
        data = self._call(abi.KVMI_GET_VERSION, timeout=timeout)
        if len(data) == 8:  # hosts without the features member
            data += bytes(8)
        return self._reply(abi.KVMI_GET_VERSION, data)

    def _check(self, msg_id: int, ident: int, timeout: float | None) -> bool:
        try:
            self._call(msg_id, timeout=timeout, id=ident)
        except (KvmENOENT, KvmEPERM, KvmEOPNOTSUPP, KvmENOSYS):
            return False
        return True

    def check_command(self, command_id: int, timeout: float | None = None) -> bool:
        """True if the host supports and allows ``command_id`` (ENOENT/EPERM -> False)."""
        return self._check(abi.KVMI_CHECK_COMMAND, command_id, timeout)

    def check_event(self, event_id: int, timeout: float | None = None) -> bool:
        """True if the host supports and allows ``event_id`` (ENOENT/EPERM -> False)."""
        return self._check(abi.KVMI_CHECK_EVENT, event_id, timeout)

    def get_guest_info(self, timeout: float | None = None) -> Any:
        """``kvmi_get_guest_info_reply`` (vcpu_count)."""
        return self._reply(abi.KVMI_GET_GUEST_INFO,
                           self._call(abi.KVMI_GET_GUEST_INFO, timeout=timeout))

    def get_vcpu_info(self, vcpu: int, timeout: float | None = None) -> Any:
        """``kvmi_get_vcpu_info_reply`` (tsc_speed in Hz, 0 if unknown)."""
        return self._reply(abi.KVMI_GET_VCPU_INFO,
                           self._call(abi.KVMI_GET_VCPU_INFO, vcpu, timeout))

    def pause_vcpu(self, vcpu: int, wait: bool = False, timeout: float | None = None) -> None:
        """Kick ``vcpu``; it sends KVMI_EVENT_PAUSE_VCPU and waits for its reply."""
        self._call(abi.KVMI_PAUSE_VCPU, vcpu, timeout, wait=int(wait))

    def control_vm_events(self, event_id: int, enable: bool, timeout: float | None = None) -> None:
        """Enable/disable a VM event (KVMI_EVENT_UNHOOK...)."""
        self._call(abi.KVMI_CONTROL_VM_EVENTS, None, timeout, event_id=event_id,
                   enable=int(enable))

    def control_events(self, vcpu: int, event_id: int, enable: bool,
                       timeout: float | None = None) -> None:
        """Enable/disable a vCPU event (CR, MSR, BREAKPOINT, HYPERCALL, PF, ...)."""
        self._call(abi.KVMI_CONTROL_EVENTS, vcpu, timeout, event_id=event_id, enable=int(enable))

    def control_cr(self, vcpu: int, cr: int, enable: bool, timeout: float | None = None) -> None:
        """Report (or stop reporting) writes to control register ``cr``."""
        self._call(abi.KVMI_CONTROL_CR, vcpu, timeout, cr=cr, enable=int(enable))

    def control_msr(self, vcpu: int, msr: int, enable: bool, timeout: float | None = None) -> None:
        """Report (or stop reporting) writes to model-specific register ``msr``."""
        self._call(abi.KVMI_CONTROL_MSR, vcpu, timeout, msr=msr, enable=int(enable))

    def control_singlestep(self, vcpu: int, enable: bool, timeout: float | None = None) -> None:
        """Single-step ``vcpu`` (KVMI_EVENT_SINGLESTEP after each instruction)."""
        self._call(abi.KVMI_VCPU_CONTROL_SINGLESTEP, vcpu, timeout, enable=int(enable))

    def get_registers(self, vcpu: int, msrs: Iterable[int] = (),
                      timeout: float | None = None) -> Registers:
        """Registers of ``vcpu``: :data:`Registers` (mode, regs, sregs, msrs {index: data})."""
        idx = list(msrs)
        data = self._call(abi.KVMI_GET_REGISTERS, vcpu, timeout,
                          tail=abi.pack_flex("u32", idx), nmsrs=len(idx))
        fixed = abi.KVMI_GET_REGISTERS_REPLY
        entry = abi.KVM_MSR_ENTRY
        if len(data) != fixed.size + entry.size * len(idx):
            self._reply_size_error(abi.KVMI_GET_REGISTERS, len(data),
                                   fixed.size + entry.size * len(idx))
        try:
            head = fixed.decode(data)
            if head.msrs.nmsrs != len(idx):
                raise abi.SizeError(f"nmsrs {head.msrs.nmsrs}, asked for {len(idx)}")
            values = {}
            for k in range(len(idx)):
                e = entry.decode(data, fixed.size + k * entry.size)
                values[e.index] = e.data
        except abi.AbiError as exc:
            err = MalformedMessage(f"KVMI_GET_REGISTERS reply: {exc}")
            self._shutdown(err)
            raise err from None
        return Registers(head.mode, head.regs, head.sregs, values)

    def _reply_size_error(self, msg_id: int, got: int, expected: int) -> None:
        err = MalformedMessage(f"{abi.COMMAND_NAMES[msg_id]} reply has {got} bytes, "
                               f"expected {expected}")
        self._shutdown(err)
        raise err

    def set_registers(self, vcpu: int, regs: Mapping[str, int] | Any,
                      timeout: float | None = None) -> None:
        """Set the general registers (a ``kvm_regs`` namedtuple or a full mapping)."""
        self.request(abi.KVMI_SET_REGISTERS, abi.KVM_REGS.encode(regs), vcpu, timeout)

    def get_cpuid(self, vcpu: int, function: int, index: int = 0,
                  timeout: float | None = None) -> Any:
        """A CPUID leaf as the guest sees it: ``kvmi_get_cpuid_reply`` (eax, ebx, ecx, edx)."""
        return self._reply(abi.KVMI_GET_CPUID, self._call(abi.KVMI_GET_CPUID, vcpu, timeout,
                                                          function=function, index=index))

    def get_xsave(self, vcpu: int, timeout: float | None = None) -> bytes:
        """The vCPU's XSAVE area (raw bytes)."""
        return self._call(abi.KVMI_GET_XSAVE, vcpu, timeout)

    def set_xsave(self, vcpu: int, region: bytes, timeout: float | None = None) -> None:
        """Write the vCPU's XSAVE area (raw bytes, a multiple of 4)."""
        if len(region) % 4:
            raise ValueError("XSAVE region must be a multiple of 4 bytes")
        self.request(abi.KVMI_VCPU_SET_XSAVE, bytes(region), vcpu, timeout)

    def get_xcr(self, vcpu: int, xcr: int = 0, timeout: float | None = None) -> int:
        """Value of extended control register ``xcr``."""
        return self._reply(abi.KVMI_VCPU_GET_XCR,
                           self._call(abi.KVMI_VCPU_GET_XCR, vcpu, timeout, xcr=xcr)).value

    def read_physical(self, gpa: int, size: int, timeout: float | None = None) -> bytes:
        """Read guest-physical memory, in page-bounded chunks (each below 8184 bytes)."""
        if size < 0 or size > _MAX_READ:
            raise ValueError(f"read size {size} outside [0, {_MAX_READ}]")
        out = bytearray()
        while len(out) < size:
            addr = gpa + len(out)
            chunk = min(size - len(out), _PAGE - (addr & (_PAGE - 1)))
            data = self._call(abi.KVMI_READ_PHYSICAL, None, timeout, gpa=addr, size=chunk)
            if len(data) != chunk:
                self._reply_size_error(abi.KVMI_READ_PHYSICAL, len(data), chunk)
            out += data
        return bytes(out)

    def write_physical(self, gpa: int, data: bytes, timeout: float | None = None) -> None:
        """Write guest-physical memory, in page-bounded chunks."""
        if len(data) > _MAX_READ:
            raise ValueError(f"write size {len(data)} above {_MAX_READ}")
        view = memoryview(bytes(data))
        done = 0
        while done < len(view):
            addr = gpa + done
            chunk = min(len(view) - done, _PAGE - (addr & (_PAGE - 1)))
            self._call(abi.KVMI_WRITE_PHYSICAL, None, timeout, tail=bytes(view[done:done + chunk]),
                       gpa=addr, size=chunk)
            done += chunk

    def query_physical(self, gfn: int, timeout: float | None = None) -> Any:
        """``kvmi_query_physical_reply`` (gfn, size) of the memory slot holding ``gfn``."""
        return self._reply(abi.KVMI_QUERY_PHYSICAL,
                           self._call(abi.KVMI_QUERY_PHYSICAL, None, timeout, gfn=gfn))

    def inject_exception(self, vcpu: int, nr: int, error_code: int = 0, address: int = 0,
                         timeout: float | None = None) -> None:
        """Inject exception vector ``nr`` (e.g. 14 with ``address`` = CR2 for a #PF)."""
        self._call(abi.KVMI_INJECT_EXCEPTION, vcpu, timeout, nr=nr, error_code=error_code,
                   address=address)

    def translate_gva(self, vcpu: int, gva: int, timeout: float | None = None) -> int:
        """Guest-physical address of ``gva`` in ``vcpu``'s current address space."""
        return self._reply(abi.KVMI_VCPU_TRANSLATE_GVA,
                           self._call(abi.KVMI_VCPU_TRANSLATE_GVA, vcpu, timeout, gva=gva)).gpa

    def get_mtrr_type(self, vcpu: int, gpa: int, timeout: float | None = None) -> int:
        """The memory type of ``gpa``."""
        return self._reply(abi.KVMI_GET_MTRR_TYPE,
                           self._call(abi.KVMI_GET_MTRR_TYPE, vcpu, timeout, gpa=gpa)).type

    # page access (EPT) --------------------------------------------------------------------
    _MAX_ENTRIES = (abi.KVMI_MSG_SIZE - 8) // 16  # entries (or gpas padded) per message

    def get_page_access(self, gpas: Sequence[int], view: int = 0,
                        timeout: float | None = None) -> list[int]:
        """Access bits (KVMI_PAGE_ACCESS_R/W/X) of each guest-physical page."""
        out: list[int] = []
        for k in range(0, len(gpas), self._MAX_ENTRIES):
            part = list(gpas[k:k + self._MAX_ENTRIES])
            data = self._call(abi.KVMI_GET_PAGE_ACCESS, None, timeout,
                              tail=abi.pack_flex("u64", part), view=view, count=len(part))
            if len(data) != len(part):
                self._reply_size_error(abi.KVMI_GET_PAGE_ACCESS, len(data), len(part))
            out.extend(data)
        return out

    def set_page_access(self, entries: Iterable[tuple[int, int]], view: int = 0,
                        timeout: float | None = None) -> None:
        """Set access bits: ``entries`` of (gpa, access); violations raise KVMI_EVENT_PF."""
        items = [{"gpa": g, "access": a} for g, a in entries]
        for k in range(0, len(items), self._MAX_ENTRIES):
            part = items[k:k + self._MAX_ENTRIES]
            self._call(abi.KVMI_SET_PAGE_ACCESS, None, timeout,
                       tail=abi.pack_flex(abi.KVMI_PAGE_ACCESS_ENTRY, part), view=view,
                       count=len(part))

    def get_page_write_bitmap(self, gpas: Sequence[int], view: int = 0,
                              timeout: float | None = None) -> list[int]:
        """SPP write bitmaps (one u32 per page, 128-byte granularity)."""
        out: list[int] = []
        for k in range(0, len(gpas), self._MAX_ENTRIES):
            part = list(gpas[k:k + self._MAX_ENTRIES])
            data = self._call(abi.KVMI_GET_PAGE_WRITE_BITMAP, None, timeout,
                              tail=abi.pack_flex("u64", part), view=view, count=len(part))
            try:
                out.extend(abi.unpack_flex("u32", data, len(part)))
            except abi.AbiError as exc:
                self._shutdown(MalformedMessage(str(exc)))
                raise MalformedMessage(f"KVMI_GET_PAGE_WRITE_BITMAP reply: {exc}") from None
        return out

    def set_page_write_bitmap(self, entries: Iterable[tuple[int, int]], view: int = 0,
                              timeout: float | None = None) -> None:
        """Set SPP write bitmaps: ``entries`` of (gpa, bitmap)."""
        items = [{"gpa": g, "bitmap": b} for g, b in entries]
        for k in range(0, len(items), self._MAX_ENTRIES):
            part = items[k:k + self._MAX_ENTRIES]
            self._call(abi.KVMI_SET_PAGE_WRITE_BITMAP, None, timeout,
                       tail=abi.pack_flex(abi.KVMI_PAGE_WRITE_BITMAP_ENTRY, part), view=view,
                       count=len(part))

    def control_spp(self, enable: bool, timeout: float | None = None) -> None:
        """Enable/disable sub-page write protection."""
        self._call(abi.KVMI_CONTROL_SPP, None, timeout, enable=int(enable))

    def get_map_token(self, timeout: float | None = None) -> bytes:
        """A token for mapping guest memory through /dev/kvmmem (32 bytes)."""
        data = self._call(abi.KVMI_GET_MAP_TOKEN, None, timeout)
        if len(data) != abi.KVMI_MEM_TOKEN.size:
            self._reply_size_error(abi.KVMI_GET_MAP_TOKEN, len(data), abi.KVMI_MEM_TOKEN.size)
        return data

    # EPT views, #VE, gfns -----------------------------------------------------------------
    def get_max_gfn(self, timeout: float | None = None) -> int:
        """Highest guest frame number."""
        return self._reply(abi.KVMI_GET_MAX_GFN,
                           self._call(abi.KVMI_GET_MAX_GFN, None, timeout)).gfn

    def get_next_available_gfn(self, timeout: float | None = None) -> int:
        """Next guest frame number free for alloc_gfn."""
        return self._reply(abi.KVMI_GET_NEXT_AVAILABLE_GFN,
                           self._call(abi.KVMI_GET_NEXT_AVAILABLE_GFN, None, timeout)).gfn

    def set_ve_info_page(self, vcpu: int, gpa: int, trigger_vmexit: bool = False,
                         timeout: float | None = None) -> None:
        """Set the #VE information page of ``vcpu``."""
        self._call(abi.KVMI_SET_VE_INFO_PAGE, vcpu, timeout, gpa=gpa,
                   trigger_vmexit=int(trigger_vmexit))

    def disable_ve(self, vcpu: int, timeout: float | None = None) -> None:
        """Disable #VE on ``vcpu``."""
        self._call(abi.KVMI_DISABLE_VE, vcpu, timeout)

    def switch_ept_view(self, vcpu: int, view: int, timeout: float | None = None) -> None:
        """Make ``view`` the active EPT view of ``vcpu``."""
        self._call(abi.KVMI_SWITCH_EPT_VIEW, vcpu, timeout, view=view)

    def get_ept_view(self, vcpu: int, timeout: float | None = None) -> int:
        """The active EPT view of ``vcpu``."""
        return self._reply(abi.KVMI_GET_EPT_VIEW,
                           self._call(abi.KVMI_GET_EPT_VIEW, vcpu, timeout)).view

    def control_ept_view(self, vcpu: int, view: int, visible: bool,
                         timeout: float | None = None) -> None:
        """Make ``view`` visible (or not) to the guest's VMFUNC."""
        self._call(abi.KVMI_CONTROL_EPT_VIEW, vcpu, timeout, view=view, visible=int(visible))

    def create_ept_view(self, timeout: float | None = None) -> int:
        """Create an EPT view; returns its number."""
        return self._reply(abi.KVMI_CREATE_EPT_VIEW,
                           self._call(abi.KVMI_CREATE_EPT_VIEW, None, timeout)).view

    def destroy_ept_view(self, view: int, timeout: float | None = None) -> None:
        """Destroy EPT view ``view``."""
        self._call(abi.KVMI_DESTROY_EPT_VIEW, None, timeout, view=view)

    def alloc_gfn(self, gfn: int, vcpu: int = 0, timeout: float | None = None) -> None:
        """Back guest frame ``gfn`` with new memory."""
        self._call(abi.KVMI_VCPU_ALLOC_GFN, vcpu, timeout, gfn=gfn)

    def free_gfn(self, gfn: int, vcpu: int = 0, timeout: float | None = None) -> None:
        """Release guest frame ``gfn`` allocated with alloc_gfn."""
        self._call(abi.KVMI_VCPU_FREE_GFN, vcpu, timeout, gfn=gfn)

    def change_gfn(self, vcpu: int, view: int, old_gfn: int, new_gfn: int,
                   timeout: float | None = None) -> None:
        """In EPT ``view``, map ``old_gfn`` to the memory of ``new_gfn``."""
        self._call(abi.KVMI_VCPU_CHANGE_GFN, vcpu, timeout, view=view, old_gfn=old_gfn,
                   new_gfn=new_gfn)

    # vmitrace vendor extension ------------------------------------------------------------
    def set_breakpoint(self, gva: int, timeout: float | None = None) -> None:
        """Instrumentation breakpoint at guest virtual ``gva`` (vmitrace hosts only)."""
        self._call(abi.VMITRACE_SET_BREAKPOINT, None, timeout, gva=gva)

    def set_breakpoint_ex(self, gva: int, run_on: bool = False, block_reg: int = 0,
                          block_values: Sequence[int] = (),
                          captures: Sequence[tuple[int, int, int]] = (),
                          block_flags: int = 0, differ_words: tuple[int, int] = (0, 0),
                          timeout: float | None = None) -> None:
        """Breakpoint at ``gva`` whose hits carry ``captures``: up to two (base, offset, length)
        regions of guest memory copied at the hit (``event.captured``), base = a general
        register (x86 encoding) or ``abi.VMITRACE_CAPTURE_GS_BASE``, length 1-256. With
        ``run_on`` the hits need no reply (the vCPU runs on; ``event.blocking`` is False),
        except those where the low 32 bits of register ``block_reg`` (0 = rax, 6 = rsi) equal
        one of ``block_values`` (at most 16): those wait as usual. ``block_flags``:
        ``abi.VMITRACE_BLOCK_FROM_CAPTURE`` takes the value from u64 word ``block_reg`` of
        the first capture instead; ``abi.VMITRACE_BLOCK_BITMAP`` makes ``block_values`` a
        512-bit set (``abi.block_bitmap``); ``abi.VMITRACE_BLOCK_WORDS_DIFFER`` also makes
        hits wait where the first capture's u64 words ``differ_words`` differ;
        ``abi.VMITRACE_BLOCK_DIFFER_REVERSED`` (with both) takes a second bitmap after the
        first, of values that wait where those words are equal instead. Setting an address
        again replaces its rule (vmitrace hosts only).
        """
        from_capture = bool(block_flags & abi.VMITRACE_BLOCK_FROM_CAPTURE)
        bitmap = bool(block_flags & abi.VMITRACE_BLOCK_BITMAP)
        differ = bool(block_flags & abi.VMITRACE_BLOCK_WORDS_DIFFER)
        reversed_flags = abi.VMITRACE_BLOCK_BITMAP | abi.VMITRACE_BLOCK_WORDS_DIFFER | \
            abi.VMITRACE_BLOCK_DIFFER_REVERSED
        reversed_set = bool(block_flags & abi.VMITRACE_BLOCK_DIFFER_REVERSED)
        max_reg = abi.VMITRACE_MAX_CAPTURE // 8 - 1 if from_capture else 15
        first = captures[0][2] if captures else 0
        known = abi.VMITRACE_BLOCK_FROM_CAPTURE | reversed_flags
        values = abi.VMITRACE_MAX_BLOCK_VALUES * (2 if reversed_set else 1)
        if len(block_values) > values or not 0 <= block_reg <= max_reg \
                or len(captures) > abi.VMITRACE_CAPTURES or block_flags & ~known or \
                (reversed_set and block_flags & reversed_flags != reversed_flags) or \
                (bitmap and len(block_values) != values) or \
                (from_capture and first < (block_reg + 1) * 8) or \
                (differ and (min(differ_words) < 0 or first < (max(differ_words) + 1) * 8)) or \
                (not differ and any(differ_words)):
            raise ValueError(f"block_reg {block_reg} (flags {block_flags:#x}, differ_words "
                             f"{differ_words}) with {len(block_values)} values and "
                             f"{len(captures)} captures: at most "
                             f"{abi.VMITRACE_MAX_BLOCK_VALUES} values (a bitmap: exactly that "
                             f"many, two with a reversed set, which needs a bitmap and "
                             f"differ_words), registers 0-15 or words inside the first capture, "
                             f"{abi.VMITRACE_CAPTURES} captures")
        regions = [dict(base=base, offset=offset, length=length)
                   for base, offset, length in captures]
        regions += [dict(base=abi.VMITRACE_CAPTURE_NONE, offset=0, length=0)] * \
            (abi.VMITRACE_CAPTURES - len(regions))
        self._call(abi.VMITRACE_SET_BREAKPOINT_EX, None, timeout,
                   tail=abi.pack_flex("u32", list(block_values)), gva=gva,
                   run_on=int(run_on), block_reg=block_reg, count=len(block_values),
                   block_flags=block_flags, differ_words=list(differ_words),
                   capture0=regions[0], capture1=regions[1])

    def set_capture_table(self, gva: int, key_word: int,
                          entries: Sequence[abi.CaptureTableEntry],
                          timeout: float | None = None) -> None:
        """Give the breakpoint at ``gva`` (set with ``set_breakpoint_ex`` and a first capture)
        a table of pointer captures: at each hit, the entries whose ``key`` equals the low 32
        bits of u64 word ``key_word`` of the first capture copy guest memory at the address
        in their ``pointer_word`` (``indirect``: at the pointer found that many bytes past
        it) into the event (``event.pointer_captures``, in table order; ``wait_if_cut``:
        the hit waits where ``max_length`` cut the copy short). At most 2048 entries, 4 per
        key; none removes the table. A new rule
        (``set_breakpoint_ex``) keeps it while its first capture covers the table's words;
        ``set_breakpoint`` and ``clear_breakpoint`` drop it. The host also refuses
        (``KvmEINVAL``) words past the end of the first capture, and (``KvmENOENT``) a
        breakpoint without one (vmitrace hosts only).
        """
        words = abi.VMITRACE_MAX_CAPTURE // 8
        per_key = collections.Counter(e.key for e in entries)
        bad = [e for e in entries
               if not (0 <= e.key < abi.VMITRACE_TABLE_KEYS and 0 <= e.pointer_word < words
                       and (e.length_word is None or 0 <= e.length_word < words)
                       and (e.indirect is None or 0 <= e.indirect <= 0xFF)
                       and 1 <= e.max_length <= abi.VMITRACE_MAX_POINTER_CAPTURE)]
        if len(entries) > abi.VMITRACE_MAX_TABLE_ENTRIES or not 0 <= key_word < words or bad \
                or max(per_key.values(), default=0) > abi.VMITRACE_MAX_TABLE_CAPTURES:
            raise ValueError(f"capture table keyed by word {key_word} with {len(entries)} "
                             f"entries: at most {abi.VMITRACE_MAX_TABLE_ENTRIES}, "
                             f"{abi.VMITRACE_MAX_TABLE_CAPTURES} per key (0-"
                             f"{abi.VMITRACE_TABLE_KEYS - 1}), words 0-{words - 1}, lengths "
                             f"1-{abi.VMITRACE_MAX_POINTER_CAPTURE}, offsets 0-255; refused: "
                             f"{bad[:3]}")
        rows = [dict(key=e.key, pointer_word=e.pointer_word, max_length=e.max_length,
                     length_word=abi.VMITRACE_TABLE_NO_LENGTH if e.length_word is None
                     else e.length_word,
                     flags=(abi.VMITRACE_TABLE_STRING if e.string else 0)
                     | (abi.VMITRACE_TABLE_SIGNED_LENGTH if e.signed_length else 0)
                     | (abi.VMITRACE_TABLE_WORDS32 if e.words32 else 0)
                     | (abi.VMITRACE_TABLE_INDIRECT if e.indirect is not None else 0)
                     | (abi.VMITRACE_TABLE_WAIT_IF_CUT if e.wait_if_cut else 0),
                     offset=e.indirect or 0)
                for e in entries]
        self._call(abi.VMITRACE_SET_CAPTURE_TABLE, None, timeout,
                   tail=abi.pack_flex(abi.VMITRACE_TABLE_ENTRY, rows), gva=gva,
                   key_word=key_word, count=len(entries))

    def clear_breakpoint(self, gva: int, timeout: float | None = None) -> None:
        """Remove the breakpoint at ``gva``."""
        self._call(abi.VMITRACE_CLEAR_BREAKPOINT, None, timeout, gva=gva)

    def set_delivery(self, blocking: bool, timeout: float | None = None) -> None:
        """Blocking (default) or non-blocking event delivery (vmitrace hosts only).

        Events received after the successful reply carry ``blocking=False`` and need no
        reply; :meth:`reply` then sends nothing.
        """
        def switch() -> None:
            self.blocking = bool(blocking)

        payload = abi.VMITRACE_DELIVERY.encode(blocking=int(blocking))
        self.request(abi.VMITRACE_SET_DELIVERY, payload, None, timeout, _on_success=switch)

    def get_vcpu_stats(self, vcpu: int, timeout: float | None = None) -> Any:
        """What delivering events has cost ``vcpu`` since QEMU started (vmitrace hosts only):
        a ``vmitrace_vcpu_stats`` tuple (events, waits, timeouts, event_us, wait_us,
        max_wait_us). Differences between two calls give the cost of what ran between them."""
        payload = abi.VMITRACE_GET_VCPU_STATS_.encode({"vcpu": vcpu})  # a field, no vcpu hdr
        return self._reply(abi.VMITRACE_GET_VCPU_STATS,
                           self.request(abi.VMITRACE_GET_VCPU_STATS, payload, None, timeout))


#: The counters of ``vmitrace_vcpu_stats`` (max_wait_us is a running maximum, not a counter).
VCPU_STATS_COUNTERS = ("events", "waits", "timeouts", "event_us", "wait_us")


def vcpu_stats_delta(before: Any, after: Any) -> dict[str, int]:
    """What two readings of one vCPU's :meth:`Session.get_vcpu_stats` counted in between."""
    return {field: getattr(after, field) - getattr(before, field)
            for field in VCPU_STATS_COUNTERS}


def _close_socket(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


# --------------------------------------------------------------------------------------------
# Listener
# --------------------------------------------------------------------------------------------

def parse_address(address: str) -> tuple[str, Any]:
    """``unix:PATH`` -> ("unix", PATH); ``vsock:PORT`` -> ("vsock", PORT)."""
    kind, sep, rest = address.partition(":")
    if not sep or not rest:
        raise ValueError(f"address {address!r}: expected unix:PATH or vsock:PORT")
    if kind == "unix":
        return "unix", rest
    if kind == "vsock":
        try:
            port = int(rest, 0)
        except ValueError:
            raise ValueError(f"address {address!r}: vsock port must be a number") from None
        if not 0 < port < 2**32:
            raise ValueError(f"address {address!r}: vsock port out of range")
        return "vsock", port
    raise ValueError(f"address {address!r}: unknown transport {kind!r} (unix, vsock)")


class Listener:
    """Listening socket for KVMI hosts; :meth:`accept` returns handshaken :class:`Session`s.

    ``address``: ``unix:PATH`` (socket file mode 0600, or 0660 with ``group``) or
    ``vsock:PORT``. A background thread accepts connections and runs each handshake in its
    own thread, so a slow or hostile host never delays the others. Failed handshakes are
    logged and counted in ``handshake_failures``.
    """

    def __init__(self, address: str, *, secret: bytes | None = None,
                 group: str | int | None = None,
                 handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
                 recorder_factory: RecorderFactory | None = None,
                 max_pending_handshakes: int = 64, **session_kw: Any) -> None:
        self.address = address
        self.kind, target = parse_address(address)
        self.path: str | None = None
        self.handshake_failures = 0
        self._secret = secret
        self._handshake_timeout = handshake_timeout
        self._recorder_factory = recorder_factory
        self._session_kw = session_kw
        self._ready: queue.Queue[Session] = queue.Queue()
        self._count_lock = threading.Lock()
        self._handshaking = threading.BoundedSemaphore(max_pending_handshakes)
        self._closing = False
        if self.kind == "unix":
            self._sock = self._bind_unix(target, group)
            self.path = target
        else:
            self._sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            self._sock.bind((socket.VMADDR_CID_ANY, target))
        self._sock.listen(64)
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True,
                                        name=f"kvmi-listener-{address}")
        self._thread.start()

    @staticmethod
    def _bind_unix(path: str, group: str | int | None) -> socket.socket:
        if os.path.lexists(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise FileExistsError(f"{path} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # stale socket of a dead listener
            else:
                raise FileExistsError(f"{path}: another listener is running")
            finally:
                probe.close()
        gid = None
        if group is not None:
            gid = group if isinstance(group, int) else grp.getgrnam(group).gr_gid
        # Bind under a private name, set mode/owner, then rename: the final path never
        # exists with looser permissions.
        tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                           f".{os.path.basename(path)}.{os.getpid()}.{pysecrets.token_hex(4)}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(tmp)
            os.chmod(tmp, 0o660 if gid is not None else 0o600)
            if gid is not None:
                os.chown(tmp, -1, gid)
            os.rename(tmp, path)
        except BaseException:
            sock.close()
            if os.path.lexists(tmp):
                os.unlink(tmp)
            raise
        return sock

    def _accept_loop(self) -> None:
        while not self._closing:
            try:
                r, _, _ = select.select([self._sock, self._wake_r], [], [])
            except (OSError, ValueError):
                return
            if self._wake_r in r or self._closing:
                return
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            if not self._handshaking.acquire(blocking=False):
                log.warning("kvmi listener %s: too many pending handshakes, refusing a host",
                            self.address)
                self._count_failure()
                _close_socket(conn)
                continue
            threading.Thread(target=self._handshake, args=(conn,), daemon=True,
                             name="kvmi-handshake").start()

    def _handshake(self, conn: socket.socket) -> None:
        try:
            session = Session.from_socket(conn, secret=self._secret,
                                          handshake_timeout=self._handshake_timeout,
                                          recorder_factory=self._recorder_factory,
                                          **self._session_kw)
        except (KvmiError, OSError) as exc:
            self._count_failure()
            log.warning("kvmi listener %s: handshake failed: %s", self.address, exc)
            return
        finally:
            self._handshaking.release()
        if self._closing:
            session.close()
            return
        log.info("kvmi: VM %r (%s) connected", session.name, session.uuid)
        self._ready.put(session)

    def _count_failure(self) -> None:
        with self._count_lock:
            self.handshake_failures += 1

    def accept(self, timeout: float | None = None) -> Session | None:
        """The next host that completed its handshake; None after ``timeout`` seconds."""
        try:
            return self._ready.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        """Stop listening and remove the socket file; accepted sessions stay open."""
        if self._closing:
            return
        self._closing = True
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=5)
        _close_socket(self._sock)
        os.close(self._wake_r)
        os.close(self._wake_w)
        if self.path and os.path.lexists(self.path):
            try:
                os.unlink(self.path)
            except OSError:
                pass
        while True:  # sessions handshaken but never accepted
            try:
                self._ready.get_nowait().close()
            except queue.Empty:
                break

    def __enter__(self) -> "Listener":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

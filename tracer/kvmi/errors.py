"""Typed errors of the KVMI client.

* :class:`ProtocolError` (and subclasses): the peer sent bytes that violate the dialect; the
  connection that carried them is closed.
* :class:`CommandError` (and one subclass per ``KVM_E*`` code): the host answered a command
  with a negative error code. ``.name``/``.value`` carry the C name and the positive number.
* :class:`CommandTimeout`, :class:`ConnectionClosed`, :class:`EventReplyError`: local failures.
"""
from __future__ import annotations

from . import abi


class KvmiError(Exception):
    """Base class of every error raised by :mod:`tracer.kvmi`."""


class ProtocolError(KvmiError, abi.AbiError):
    """The peer violated the wire protocol; the connection cannot be trusted any more.

    ``messages`` holds the valid messages that were complete in the same received data before
    the bad one (the protocol core hands them over so nothing valid is lost).
    """

    messages: list = []


class TruncatedMessage(ProtocolError):
    """The connection ended in the middle of a message (or the handshake)."""


class OversizeMessage(ProtocolError):
    """A header announced a payload larger than its message may carry (``KVMI_MSG_SIZE``,
    8184 bytes; vmitrace's events and capture tables: see ``abi.max_payload``)."""


class UnknownMessage(ProtocolError):
    """A message id that is neither an event nor the reply to a pending command."""


class SequenceError(ProtocolError):
    """A reply whose seq matches no pending command (or whose id does not match it)."""


class MalformedMessage(ProtocolError):
    """Sizes do not match the struct, non-zero padding, or out-of-range values."""


class HandshakeError(ProtocolError):
    """The host's ``kvmi_qemu2introspector`` is missing, too short or too long."""


class ConnectionClosed(KvmiError):
    """The connection is closed; ``cause`` holds the error that closed it, if any."""

    def __init__(self, message: str, cause: BaseException | None = None) -> None:
        super().__init__(message if cause is None else f"{message}: {cause}")
        self.cause = cause


class CommandTimeout(KvmiError, TimeoutError):
    """No reply within the command's timeout (a late reply is discarded)."""


class EventReplyError(KvmiError):
    """An event was replied twice, or a reply does not fit the event."""


class CommandError(KvmiError):
    """The host answered a command with ``-KVM_E*``.

    Attributes: ``value`` (positive errno, e.g. 95), ``name`` (``"KVM_EOPNOTSUPP"``),
    ``command`` (C name of the command that failed).
    """

    value: int = 0

    def __init__(self, value: int, command: str = "") -> None:
        self.value = value
        self.name = abi.KVM_ERRNO_NAMES.get(value, f"KVM_E{value}")
        self.command = command
        super().__init__(f"{command or 'command'} failed: -{self.name} (-{value})")


class KvmEPERM(CommandError):
    value = abi.KVM_EPERM


class KvmENOENT(CommandError):
    value = abi.KVM_ENOENT


class KvmE2BIG(CommandError):
    value = abi.KVM_E2BIG


class KvmEAGAIN(CommandError):
    value = abi.KVM_EAGAIN


class KvmENOMEM(CommandError):
    value = abi.KVM_ENOMEM


class KvmEFAULT(CommandError):
    value = abi.KVM_EFAULT


class KvmEBUSY(CommandError):
    value = abi.KVM_EBUSY


class KvmEINVAL(CommandError):
    value = abi.KVM_EINVAL


class KvmEOPNOTSUPP(CommandError):
    value = abi.KVM_EOPNOTSUPP


class KvmENOSYS(CommandError):
    value = abi.KVM_ENOSYS


_BY_VALUE: dict[int, type[CommandError]] = {
    c.value: c for c in (KvmEPERM, KvmENOENT, KvmE2BIG, KvmEAGAIN, KvmENOMEM, KvmEFAULT,
                         KvmEBUSY, KvmEINVAL, KvmEOPNOTSUPP, KvmENOSYS)}


def command_error(err: int, command: str = "") -> CommandError:
    """The exception for a (negative) ``kvmi_error_code.err`` value."""
    value = -err
    return _BY_VALUE.get(value, CommandError)(value, command)


def is_unsupported(exc: BaseException) -> bool:
    """True for the answers of a host that does not implement a command or event."""
    return isinstance(exc, (KvmEOPNOTSUPP, KvmENOSYS, KvmENOENT))

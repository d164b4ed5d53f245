"""KVMI (kvmi-v7 dialect) introspector client.

* :mod:`tracer.kvmi.abi` - constants under their C names and every wire struct as a table.
* :mod:`tracer.kvmi.protocol` - sans-IO protocol core (bytes <-> typed messages).
* :mod:`tracer.kvmi.transport` - :class:`Listener` (unix:PATH / vsock:PORT) and
  :class:`Session` (one VM: blocking commands, event loop, replies).
* :mod:`tracer.kvmi.recording` - session recordings and a replay host.
"""
from . import abi
from .errors import (CommandError, CommandTimeout, ConnectionClosed, EventReplyError,
                     HandshakeError, KvmE2BIG, KvmEAGAIN, KvmEBUSY, KvmEFAULT, KvmEINVAL,
                     KvmENOENT, KvmENOMEM, KvmENOSYS, KvmEOPNOTSUPP, KvmEPERM, KvmiError,
                     MalformedMessage, OversizeMessage, ProtocolError, SequenceError,
                     TruncatedMessage, UnknownMessage, command_error, is_unsupported)
from .events import (EVENT_CLASSES, BreakpointEvent, CpuidEvent, CreateVcpuEvent, CrEvent,
                     DescriptorEvent, Event, EventArch, HypercallEvent, MsrEvent,
                     PauseVcpuEvent, PfEvent, PointerCapture, SingleStepEvent, TrapEvent,
                     UnhookEvent, XsetbvEvent)
from .protocol import CommandReply, Handshake, IntrospectorProtocol
from .recording import RecordingError, RecordingReader, RecordingWriter, ReplayHost
from .transport import Listener, Registers, Session, parse_address

__all__ = [
    "abi", "Listener", "Session", "Registers", "parse_address",
    "RecordingWriter", "RecordingReader", "ReplayHost", "RecordingError",
    "IntrospectorProtocol", "Handshake", "CommandReply",
    "Event", "EventArch", "EVENT_CLASSES", "UnhookEvent", "CrEvent", "MsrEvent", "XsetbvEvent",
    "BreakpointEvent", "PointerCapture", "HypercallEvent", "PfEvent", "TrapEvent",
    "DescriptorEvent", "CreateVcpuEvent", "PauseVcpuEvent", "SingleStepEvent", "CpuidEvent",
    "KvmiError", "ProtocolError", "TruncatedMessage", "OversizeMessage", "UnknownMessage",
    "SequenceError", "MalformedMessage", "HandshakeError", "ConnectionClosed",
    "CommandTimeout", "EventReplyError", "CommandError", "KvmEPERM", "KvmENOENT", "KvmE2BIG",
    "KvmEAGAIN", "KvmENOMEM", "KvmEFAULT", "KvmEBUSY", "KvmEINVAL", "KvmEOPNOTSUPP",
    "KvmENOSYS", "command_error", "is_unsupported",
]

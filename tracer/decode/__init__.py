"""System-call decoding: symbolic flags and enums, strings, sockaddrs, argv, OUT parameters."""
from tracer.decode.syscalls import (DecodedCall, Limits, SyscallDecoder, SyscallInfo,
                                    decode_sockaddr, ia32_syscall_table, syscall_table,
                                    wait_exit_code)

__all__ = ["DecodedCall", "Limits", "SyscallDecoder", "SyscallInfo", "decode_sockaddr",
           "ia32_syscall_table", "syscall_table", "wait_exit_code"]

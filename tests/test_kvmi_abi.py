"""Byte-exact vectors for every kvmi-v7 wire struct, built independently of tracer.kvmi.abi.

Each format below was written from the field lists of libkvmi master's
include/linux/kvmi.h, include/linux/x86_64/asm/kvmi.h, libkvmi.h (handshake) and Linux
asm/kvm.h, with padding as 'x' (so it is skipped and must encode as zero).
"""
from __future__ import annotations

import json
import random
import re
import struct

import pytest
from click.testing import CliRunner

from tracer.cli import main
from tracer.kvmi import abi

SEG = "QIH8BBx"  # kvm_segment
DT = "QH6x"  # kvm_dtable
REGS = "18Q"
SREGS = SEG * 8 + DT * 2 + "7Q" + "4Q"
ARCH = "BxH4x" + REGS + SREGS + "9Q"

INDEPENDENT: dict[str, str] = {
    "kvmi_msg_hdr": "HHI",
    "kvmi_error_code": "i4x",
    "kvmi_vcpu_hdr": "H2x4x",
    "kvm_regs": REGS,
    "kvm_segment": SEG,
    "kvm_dtable": DT,
    "kvm_sregs": SREGS,
    "kvm_msr_entry": "IIQ",  # index, reserved (a value field in asm/kvm.h), data
    "kvm_msrs": "I4x",
    "kvmi_qemu2introspector": "I16s4xq64s",
    "kvmi_introspector2qemu": "I20s",
    "kvmi_event_arch.msrs": "9Q",
    "kvmi_event_arch": ARCH,
    "kvmi_features": "BBBB4x",
    "kvmi_get_version_reply": "I4x" + "BBBB4x",
    "kvmi_control_cmd_response": "BB2x4x",
    "kvmi_check_command": "H2x4x",
    "kvmi_check_event": "H2x4x",
    "kvmi_get_guest_info_reply": "I12x",
    "kvmi_get_page_access": "HH4x",
    "kvmi_get_page_access_reply": "",
    "kvmi_page_access_entry": "QB1x2x4x",
    "kvmi_set_page_access": "HH4x",
    "kvmi_control_spp": "B1x2x4x",
    "kvmi_get_page_write_bitmap": "HH4x",
    "kvmi_get_page_write_bitmap_reply": "",
    "kvmi_page_write_bitmap_entry": "QI4x",
    "kvmi_set_page_write_bitmap": "HH4x",
    "kvmi_get_vcpu_info_reply": "Q",
    "kvmi_pause_vcpu": "B1x2x4x",
    "kvmi_control_events": "HB1x4x",
    "kvmi_control_vm_events": "HB1x4x",
    "kvmi_read_physical": "QQ",
    "kvmi_write_physical": "QQ",
    "kvmi_query_physical": "Q",
    "kvmi_query_physical_reply": "QQ",
    "kvmi_inject_exception": "B1x2xIQ",
    "kvmi_event": "HHBB2x" + ARCH,  # the first padding byte: vmitrace's flags
    "kvmi_event_reply": "BB2x4x",
    "kvmi_event_pf": "QQB1xH4x",
    "kvmi_event_pf_reply": "QIBB2x256s",
    "kvmi_event_breakpoint": "QB7x",
    "kvmi_mem_token": "4Q",
    "kvmi_get_max_gfn_reply": "Q",
    "kvmi_get_next_available_gfn_reply": "Q",
    "kvmi_set_ve_info_page": "QB7x",
    "kvmi_set_ept_page_conv_req": "HB5xQ",
    "kvmi_get_ept_page_conv_req": "H6xQ",
    "kvmi_get_ept_page_conv_reply": "B7x",
    "kvmi_switch_ept_view_req": "H6x",
    "kvmi_get_ept_view_reply": "H6x",
    "kvmi_control_ept_view_req": "HB1x4x",
    "kvmi_vcpu_get_xcr": "B7x",
    "kvmi_vcpu_get_xcr_reply": "Q",
    "kvmi_vcpu_control_singlestep": "B7x",
    "kvmi_vcpu_translate_gva": "Q",
    "kvmi_vcpu_translate_gva_reply": "Q",
    "kvmi_vcpu_change_gfn": "H2x4xQQ",
    "kvmi_vcpu_alloc_gfn": "Q",
    "kvmi_vcpu_free_gfn": "Q",
    "kvmi_create_ept_view_reply": "H6x",
    "kvmi_destroy_ept_view": "H6x",
    "kvmi_event_trap": "B1x2xIQ",
    "kvmi_get_registers": "H2x4x",
    "kvmi_get_registers_reply": "I4x" + REGS + SREGS + "I4x",
    "kvmi_get_cpuid": "II",
    "kvmi_get_cpuid_reply": "IIII",
    "kvmi_control_cr": "B1x2xI",
    "kvmi_event_cr": "H6xQQ",
    "kvmi_event_cr_reply": "Q",
    "kvmi_control_msr": "B1x2xI",
    "kvmi_event_msr": "I4xQQ",
    "kvmi_event_msr_reply": "Q",
    "kvmi_get_xsave_reply": "",
    "kvmi_vcpu_set_xsave": "",
    "kvmi_get_mtrr_type": "Q",
    "kvmi_get_mtrr_type_reply": "B7x",
    "kvmi_event_descriptor": "BB6x",
    "kvmi_event_cpuid": "IIB3x4x",
    "kvmi_event_singlestep": "B7x",
    "vmitrace_breakpoint": "Q",
    "vmitrace_delivery": "B7x",
    "vmitrace_capture": "BxHi",
    "vmitrace_breakpoint_ex": "QBBBB2B2x" + "BxHi" * 2,  # + u32 block_values[count]
    "vmitrace_captured": "2H4x",
    "vmitrace_capture_table": "QB3xI",  # + vmitrace_table_entry[count]
    "vmitrace_table_entry": "HBBHBB",
    "vmitrace_table_captured": "B7x",
    "vmitrace_pointer_capture": "QHB5x",
    "vmitrace_get_vcpu_stats": "H6x",
    "vmitrace_vcpu_stats": "6Q",
}

SIZES = {  # from the headers (sizeof)
    "kvmi_msg_hdr": 8, "kvm_regs": 144, "kvm_segment": 24, "kvm_dtable": 16, "kvm_sregs": 312,
    "kvmi_event_arch": 536, "kvmi_event": 544, "kvmi_qemu2introspector": 96,
    "kvmi_introspector2qemu": 24, "kvmi_event_pf_reply": 272, "kvmi_get_registers_reply": 472,
}


def random_values(fmt: str, rng: random.Random) -> list:
    out: list = []
    for count, code in re.findall(r"(\d*)([xBHIQbhiqs])", fmt):
        n = int(count or 1)
        if code == "x":
            continue
        if code == "s":
            out.append(bytes(rng.randrange(256) for _ in range(n)))
            continue
        bits = {"B": 8, "H": 16, "I": 32, "Q": 64, "b": 8, "h": 16, "i": 32, "q": 64}[code]
        for _ in range(n):
            v = rng.getrandbits(bits)
            if code.islower():
                v -= 1 << (bits - 1)
            out.append(v)
    return out


def leaves(value) -> list:
    """Flatten nested namedtuples/tuples into the order of their wire fields."""
    if isinstance(value, tuple):
        out = []
        for v in value:
            out.extend(leaves(v))
        return out
    return [value]


def rebuild(sd: abi.StructDef, flat: list):
    """Put independent flat values back into sd's namedtuple shape (by position only)."""
    it = iter(flat)

    def build(sd: abi.StructDef):
        vals = []
        for f in sd.value_fields:
            if f.kind == "struct":
                vals.append(build(f.sub))
            elif f.kind == "array":
                vals.append(tuple(next(it) for _ in range(f.count)))
            else:
                vals.append(next(it))
        return sd.tuple._make(vals)
    return build(sd)


def test_every_struct_has_an_independent_vector() -> None:
    assert set(INDEPENDENT) == set(abi.STRUCTS)


@pytest.mark.parametrize("name", sorted(INDEPENDENT))
def test_struct_matches_independent_layout(name: str) -> None:
    sd = abi.STRUCTS[name]
    fmt = "<" + INDEPENDENT[name]
    assert sd.size == struct.calcsize(fmt)
    if name in SIZES:
        assert sd.size == SIZES[name]
    rng = random.Random(name)
    for _ in range(5):
        values = random_values(fmt, rng)
        wire = struct.pack(fmt, *values)
        decoded = sd.decode(wire)
        assert leaves(decoded) == values
        assert sd.encode(decoded) == wire
        assert sd.encode(rebuild(sd, values)) == wire


@pytest.mark.parametrize("name", sorted(n for n in INDEPENDENT if "x" in INDEPENDENT[n]))
def test_nonzero_padding_is_rejected(name: str) -> None:
    sd = abi.STRUCTS[name]
    fmt = "<" + INDEPENDENT[name]
    wire = bytearray(struct.pack(fmt, *random_values(fmt, random.Random(1))))
    # Find the padding byte offsets independently: walk the format.
    offsets = []
    pos = 0
    for count, code in re.findall(r"(\d*)([xBHIQbhiqs])", fmt[1:]):
        n = int(count or 1)
        width = {"x": 1, "s": 1, "B": 1, "b": 1, "H": 2, "h": 2, "I": 4, "i": 4,
                 "Q": 8, "q": 8}[code]
        size = n if code in "xs" else n * width
        if code == "x":
            offsets.extend(range(pos, pos + n))
        pos += size
    assert offsets
    for off in offsets:
        bad = bytearray(wire)
        bad[off] = 0x01
        with pytest.raises(abi.PaddingError):
            sd.decode(bytes(bad))


def test_key_offsets_from_headers() -> None:
    def off(struct_name: str, field: str) -> int:
        return next(f.offset for f in abi.STRUCTS[struct_name].fields if f.name == field)
    assert off("kvmi_event", "arch") == 8
    assert off("kvmi_event_arch", "regs") == 8
    assert off("kvmi_event_arch", "sregs") == 152
    assert off("kvmi_event_arch", "msrs") == 464
    assert off("kvm_sregs", "gdt") == 192 and off("kvm_sregs", "cr0") == 224
    assert off("kvm_sregs", "interrupt_bitmap") == 280
    assert off("kvmi_qemu2introspector", "start_time") == 24
    assert off("kvmi_qemu2introspector", "name") == 32
    assert off("kvmi_get_registers_reply", "msrs") == 464
    assert off("kvmi_event_pf_reply", "ctx_data") == 16


def test_constants_match_the_dialect() -> None:
    ids = {"KVMI_EVENT_REPLY": 0, "KVMI_EVENT": 1, "KVMI_GET_VERSION": 2, "KVMI_CHECK_COMMAND": 3,
           "KVMI_CHECK_EVENT": 4, "KVMI_GET_GUEST_INFO": 5, "KVMI_GET_VCPU_INFO": 6,
           "KVMI_PAUSE_VCPU": 7, "KVMI_CONTROL_VM_EVENTS": 8, "KVMI_CONTROL_EVENTS": 9,
           "KVMI_CONTROL_CR": 10, "KVMI_CONTROL_MSR": 11, "KVMI_CONTROL_VE": 12,
           "KVMI_GET_REGISTERS": 13, "KVMI_SET_REGISTERS": 14, "KVMI_GET_CPUID": 15,
           "KVMI_GET_XSAVE": 16, "KVMI_READ_PHYSICAL": 17, "KVMI_WRITE_PHYSICAL": 18,
           "KVMI_INJECT_EXCEPTION": 19, "KVMI_GET_PAGE_ACCESS": 20, "KVMI_SET_PAGE_ACCESS": 21,
           "KVMI_GET_MAP_TOKEN": 22, "KVMI_GET_MTRR_TYPE": 23, "KVMI_CONTROL_SPP": 24,
           "KVMI_GET_PAGE_WRITE_BITMAP": 25, "KVMI_SET_PAGE_WRITE_BITMAP": 26,
           "KVMI_CONTROL_CMD_RESPONSE": 27, "KVMI_SET_VE_INFO_PAGE": 28, "KVMI_GET_MAX_GFN": 29,
           "KVMI_GET_NEXT_AVAILABLE_GFN": 31, "KVMI_SWITCH_EPT_VIEW": 32, "KVMI_DISABLE_VE": 33,
           "KVMI_GET_EPT_VIEW": 34, "KVMI_VCPU_TRANSLATE_GVA": 35, "KVMI_CONTROL_EPT_VIEW": 36,
           "KVMI_VCPU_GET_XCR": 37, "KVMI_VCPU_SET_XSAVE": 38, "KVMI_QUERY_PHYSICAL": 39,
           "KVMI_VCPU_ALLOC_GFN": 41, "KVMI_VCPU_FREE_GFN": 42, "KVMI_CREATE_EPT_VIEW": 43,
           "KVMI_DESTROY_EPT_VIEW": 44, "KVMI_VCPU_CHANGE_GFN": 60,
           "KVMI_VCPU_CONTROL_SINGLESTEP": 63,
           "KVMI_EVENT_UNHOOK": 0, "KVMI_EVENT_CR": 1, "KVMI_EVENT_MSR": 2, "KVMI_EVENT_XSETBV": 3,
           "KVMI_EVENT_BREAKPOINT": 4, "KVMI_EVENT_HYPERCALL": 5, "KVMI_EVENT_PF": 6,
           "KVMI_EVENT_TRAP": 7, "KVMI_EVENT_DESCRIPTOR": 8, "KVMI_EVENT_CREATE_VCPU": 9,
           "KVMI_EVENT_PAUSE_VCPU": 10, "KVMI_EVENT_SINGLESTEP": 11, "KVMI_EVENT_CPUID": 13,
           "KVMI_EVENT_ACTION_CONTINUE": 0, "KVMI_EVENT_ACTION_RETRY": 1,
           "KVMI_EVENT_ACTION_CRASH": 2, "KVMI_MSG_SIZE": 8184,
           "KVM_EPERM": 1, "KVM_ENOENT": 2, "KVM_E2BIG": 7, "KVM_EAGAIN": 11, "KVM_ENOMEM": 12,
           "KVM_EFAULT": 14, "KVM_EBUSY": 16, "KVM_EINVAL": 22, "KVM_EOPNOTSUPP": 95,
           "KVM_ENOSYS": 1000, "VMITRACE_SET_BREAKPOINT": 0x7F01,
           "VMITRACE_CLEAR_BREAKPOINT": 0x7F02, "VMITRACE_SET_DELIVERY": 0x7F03,
           "VMITRACE_SET_BREAKPOINT_EX": 0x7F04, "VMITRACE_SET_CAPTURE_TABLE": 0x7F05,
           "VMITRACE_GET_VCPU_STATS": 0x7F06,
           # the largest messages of the extension, as the plugin's kvmi-wire.h pins them
           "VMITRACE_TABLE_MSG_SIZE": 16400, "VMITRACE_EVENT_MSG_SIZE": 33920}
    consts = abi.constants()
    for name, value in ids.items():
        assert consts[name] == value, name
    # every command id 0..63 named in the header is in the command table
    assert {c.id for c in abi.COMMANDS.values() if c.id < 64} == \
        {v for k, v in ids.items() if not k.startswith(("KVMI_EVENT", "KVM_", "VMITRACE", "KVMI_MSG"))
         and v > 1}


def test_vcpu_header_placement_matches_libkvmi() -> None:
    vcpu_cmds = {n for n, c in ((c.name, c) for c in abi.COMMANDS.values()) if c.vcpu}
    assert {"KVMI_CONTROL_EVENTS", "KVMI_GET_REGISTERS", "KVMI_VCPU_TRANSLATE_GVA",
            "KVMI_GET_MTRR_TYPE", "KVMI_VCPU_ALLOC_GFN", "KVMI_PAUSE_VCPU"} <= vcpu_cmds
    assert not {"KVMI_READ_PHYSICAL", "KVMI_CONTROL_VM_EVENTS", "KVMI_CHECK_COMMAND",
                "KVMI_SET_PAGE_ACCESS", "VMITRACE_SET_BREAKPOINT", "KVMI_CREATE_EPT_VIEW"} & vcpu_cmds


def test_encode_rejects_out_of_range_and_unknown_fields() -> None:
    with pytest.raises(abi.AbiError):
        abi.KVMI_MSG_HDR.encode(id=1 << 16)
    with pytest.raises(abi.AbiError):
        abi.KVMI_MSG_HDR.encode(bogus=1)
    with pytest.raises(abi.SizeError):
        abi.KVMI_EVENT_CR_.decode(bytes(23))
    with pytest.raises(abi.SizeError):
        abi.KVMI_EVENT_CR_.decode_exact(bytes(25))


def test_cli_abi_json() -> None:
    result = CliRunner().invoke(main, ["kvmi", "abi", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    hdr = doc["structs"]["kvmi_msg_hdr"]
    assert hdr["size"] == 8
    assert {k: (v["offset"], v["size"]) for k, v in hdr["fields"].items()} == \
        {"id": (0, 2), "size": (2, 2), "seq": (4, 4)}
    assert doc["constants"]["KVMI_GET_VERSION"] == 2
    assert doc["constants"]["KVMI_EVENT_CPUID"] == 13
    for name, fmt in INDEPENDENT.items():
        assert doc["structs"][name]["size"] == struct.calcsize("<" + fmt), name
    arch = doc["structs"]["kvmi_event_arch"]["fields"]
    assert arch["sregs"] == {"offset": 152, "size": 312, "type": "struct kvm_sregs"}
    assert doc["commands"]["VMITRACE_SET_CAPTURE_TABLE"] == {
        "id": 0x7F05, "vcpu_hdr": False, "request": "vmitrace_capture_table", "reply": None}
    assert doc["structs"]["vmitrace_capture_table"]["fields"]["entries"] == {
        "offset": 16, "size": 0, "type": "struct vmitrace_table_entry[0]", "flexible_array": True}


def test_cli_abi_table_and_help() -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["kvmi", "abi", "--struct", "kvmi_event_cr"])
    assert result.exit_code == 0
    assert "struct kvmi_event_cr  /* 24 bytes */" in result.output
    assert "old_value" in result.output and "padding" in result.output
    assert runner.invoke(main, ["kvmi", "abi", "--struct", "nope"]).exit_code != 0
    help_text = runner.invoke(main, ["kvmi", "abi", "--help"]).output
    assert "Examples" in help_text and "--json" in help_text

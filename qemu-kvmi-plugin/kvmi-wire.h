/*
 * The kvmi-v7 wire format as spoken by vmitrace-kvmi (host side).
 * Layouts follow the kvmi-v7 dialect (libkvmi include/linux/kvmi.h and
 * include/linux/x86_64/asm/kvmi.h); written here from the protocol
 * description, with every size pinned by a static assertion.
 * All integers are in host byte order; every padding field is zero.
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */
#ifndef VMITRACE_KVMI_WIRE_H
#define VMITRACE_KVMI_WIRE_H

#include <assert.h>
#include <stdint.h>

/* Message ids. */
enum {
    KVMI_EVENT_REPLY = 0,
    KVMI_EVENT = 1,
    KVMI_GET_VERSION = 2,
    KVMI_CHECK_COMMAND = 3,
    KVMI_CHECK_EVENT = 4,
    KVMI_GET_GUEST_INFO = 5,
    KVMI_GET_VCPU_INFO = 6,
    KVMI_PAUSE_VCPU = 7,
    KVMI_CONTROL_VM_EVENTS = 8,
    KVMI_CONTROL_EVENTS = 9,
    KVMI_CONTROL_CR = 10,
    KVMI_CONTROL_MSR = 11,
    KVMI_GET_REGISTERS = 13,
    KVMI_READ_PHYSICAL = 17,
    KVMI_WRITE_PHYSICAL = 18,
    KVMI_VCPU_TRANSLATE_GVA = 35,
    KVMI_NUM_STANDARD_MESSAGES = 64,
    /* vmitrace vendor extension (docs/kvmi-vendor-extension.md) */
    VMITRACE_SET_BREAKPOINT = 0x7f01,
    VMITRACE_CLEAR_BREAKPOINT = 0x7f02,
    VMITRACE_SET_DELIVERY = 0x7f03,
    VMITRACE_SET_BREAKPOINT_EX = 0x7f04,
    VMITRACE_SET_CAPTURE_TABLE = 0x7f05,
    VMITRACE_GET_VCPU_STATS = 0x7f06,
};

/* Event ids. */
enum {
    KVMI_EVENT_UNHOOK = 0,
    KVMI_EVENT_CR = 1,
    KVMI_EVENT_MSR = 2,
    KVMI_EVENT_XSETBV = 3,
    KVMI_EVENT_BREAKPOINT = 4,
    KVMI_EVENT_HYPERCALL = 5,
    KVMI_EVENT_PF = 6,
    KVMI_EVENT_TRAP = 7,
    KVMI_EVENT_DESCRIPTOR = 8,
    KVMI_EVENT_CREATE_VCPU = 9,
    KVMI_EVENT_PAUSE_VCPU = 10,
    KVMI_EVENT_SINGLESTEP = 11,
    KVMI_EVENT_CPUID = 13,
    KVMI_NUM_EVENTS = 14,
};

enum {
    KVMI_EVENT_ACTION_CONTINUE = 0,
    KVMI_EVENT_ACTION_RETRY = 1,
    KVMI_EVENT_ACTION_CRASH = 2,
};

/* Error numbers; replies carry them negated. */
enum {
    KVM_EPERM = 1,
    KVM_ENOENT = 2,
    KVM_E2BIG = 7,
    KVM_EAGAIN = 11,
    KVM_ENOMEM = 12,
    KVM_EFAULT = 14,
    KVM_EBUSY = 16,
    KVM_EINVAL = 22,
    KVM_EOPNOTSUPP = 95,
    KVM_ENOSYS = 1000,
};

#define KVMI_VERSION 1u
#define KVMI_MSG_SIZE (4096 * 2 - 8) /* largest payload */

struct kvmi_msg_hdr {
    uint16_t id;
    uint16_t size; /* payload bytes after this header */
    uint32_t seq;
};

struct kvmi_error_code {
    int32_t err;
    uint32_t padding;
};

struct kvmi_vcpu_hdr {
    uint16_t vcpu;
    uint16_t padding1;
    uint32_t padding2;
};

struct kvmi_qemu2introspector {
    uint32_t struct_size;
    uint8_t uuid[16];
    uint32_t padding;
    int64_t start_time;
    char name[64];
};

struct kvmi_introspector2qemu {
    uint32_t struct_size;
    uint8_t cookie_hash[20];
};

struct kvmi_get_version_reply {
    uint32_t version;
    uint32_t padding;
    uint8_t features[8]; /* spp, vmfunc, eptp, ve, padding[4]: all 0 here */
};

struct kvmi_check_id { /* CHECK_COMMAND and CHECK_EVENT */
    uint16_t id;
    uint16_t padding1;
    uint32_t padding2;
};

struct kvmi_get_guest_info_reply {
    uint32_t vcpu_count;
    uint32_t padding[3];
};

struct kvmi_get_vcpu_info_reply {
    uint64_t tsc_speed;
};

struct kvmi_pause_vcpu {
    uint8_t wait;
    uint8_t padding1;
    uint16_t padding2;
    uint32_t padding3;
};

struct kvmi_control_events { /* CONTROL_EVENTS and CONTROL_VM_EVENTS */
    uint16_t event_id;
    uint8_t enable;
    uint8_t padding1;
    uint32_t padding2;
};

struct kvmi_control_cr {
    uint8_t enable;
    uint8_t padding1;
    uint16_t padding2;
    uint32_t cr;
};

struct kvmi_control_msr {
    uint8_t enable;
    uint8_t padding1;
    uint16_t padding2;
    uint32_t msr;
};

struct kvmi_get_registers {
    uint16_t nmsrs;
    uint16_t padding1;
    uint32_t padding2;
    /* uint32_t msrs_idx[nmsrs] follows */
};

struct kvmi_read_physical {
    uint64_t gpa;
    uint64_t size;
};

struct kvmi_write_physical {
    uint64_t gpa;
    uint64_t size;
    /* uint8_t data[size] follows */
};

struct kvmi_translate_gva {
    uint64_t gva;
};

/* struct kvm_regs / kvm_sregs / kvm_msr_entry (x86-64 KVM ABI). */
struct kvm_regs {
    uint64_t rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp;
    uint64_t r8, r9, r10, r11, r12, r13, r14, r15;
    uint64_t rip, rflags;
};

struct kvm_segment {
    uint64_t base;
    uint32_t limit;
    uint16_t selector;
    uint8_t type, present, dpl, db, s, l, g, avl, unusable, padding;
};

struct kvm_dtable {
    uint64_t base;
    uint16_t limit;
    uint16_t padding[3];
};

struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss, tr, ldt;
    struct kvm_dtable gdt, idt;
    uint64_t cr0, cr2, cr3, cr4, cr8, efer, apic_base;
    uint64_t interrupt_bitmap[4];
};

struct kvm_msr_entry {
    uint32_t index;
    uint32_t reserved;
    uint64_t data;
};

struct kvmi_event_arch {
    uint8_t mode; /* 2, 4 or 8 */
    uint8_t padding1;
    uint16_t view;
    uint8_t padding2[4];
    struct kvm_regs regs;
    struct kvm_sregs sregs;
    struct {
        uint64_t sysenter_cs, sysenter_esp, sysenter_eip;
        uint64_t efer, star, lstar, cstar, pat, shadow_gs;
    } msrs;
};

struct kvmi_event {
    uint16_t size; /* offset of the event-specific payload */
    uint16_t vcpu;
    uint8_t event;
    uint8_t flags;      /* vendor extension: VMITRACE_EVENT_NO_REPLY; 0 on standard hosts */
    uint8_t padding[2];
    struct kvmi_event_arch arch;
};

struct kvmi_event_reply {
    uint8_t action;
    uint8_t event;
    uint16_t padding1;
    uint32_t padding2;
};

struct kvmi_event_cr {
    uint16_t cr;
    uint16_t padding[3];
    uint64_t old_value;
    uint64_t new_value;
};

struct kvmi_event_msr {
    uint32_t msr;
    uint32_t padding;
    uint64_t old_value;
    uint64_t new_value;
};

struct kvmi_event_breakpoint {
    uint64_t gpa;
    uint8_t insn_len;
    uint8_t padding[7];
};

struct kvmi_get_registers_reply {
    uint32_t mode;
    uint32_t padding;
    struct kvm_regs regs;
    struct kvm_sregs sregs;
    uint32_t nmsrs; /* struct kvm_msrs header */
    uint32_t msrs_pad;
    /* struct kvm_msr_entry entries[nmsrs] follows */
};

/* Vendor extension payloads. */
struct vmitrace_breakpoint {
    uint64_t gva;
};

/* Guest memory copied into a breakpoint event at the hit (base + offset, length bytes). */
#define VMITRACE_CAPTURE_NONE 0xff
#define VMITRACE_CAPTURE_GS_BASE 16
#define VMITRACE_MAX_CAPTURE 256
#define VMITRACE_CAPTURES 2
struct vmitrace_capture {
    uint8_t base;       /* 0-15: general register, x86 encoding; 16: GS base; 0xff: none */
    uint8_t padding;
    uint16_t length;    /* at most VMITRACE_MAX_CAPTURE */
    int32_t offset;
};

/* VMITRACE_SET_BREAKPOINT_EX: 32 bytes + 4 per value (count <= 16; 32 with DIFFER_REVERSED). */
#define VMITRACE_MAX_BLOCK_VALUES 16
/* block_flags */
#define VMITRACE_BLOCK_FROM_CAPTURE 1 /* the value: u64 word block_reg of the first capture */
#define VMITRACE_BLOCK_BITMAP 2       /* block_values: a set of 0..511 (bit v of word v/32) */
#define VMITRACE_BLOCK_WORDS_DIFFER 4 /* also wait where differ_words of the first capture do */
/* With BITMAP and WORDS_DIFFER: 16 more words, a second set whose values wait where the
 * words are equal instead (and run on where they differ). */
#define VMITRACE_BLOCK_DIFFER_REVERSED 8
#define VMITRACE_MAX_BLOCK_WORDS (2 * VMITRACE_MAX_BLOCK_VALUES)
#define VMITRACE_BLOCK_BITMAP_VALUES 512
struct vmitrace_breakpoint_ex {
    uint64_t gva;
    uint8_t run_on;      /* 1: hits do not wait for a reply, except where the value is */
    uint8_t block_reg;   /* one of block_values. The value: the low 32 bits of a general */
    uint8_t count;       /* register (block_reg, x86 encoding: 0 rax ... 15 r15), or of */
    uint8_t block_flags; /* a captured word (FROM_CAPTURE, block_reg 0-31) */
    uint8_t differ_words[2]; /* u64 words of the first capture (VMITRACE_BLOCK_WORDS_DIFFER) */
    uint8_t padding[2];
    struct vmitrace_capture captures[VMITRACE_CAPTURES];
    uint32_t block_values[VMITRACE_MAX_BLOCK_VALUES];
};

/* kvmi_event.flags */
#define VMITRACE_EVENT_NO_REPLY 1 /* the vCPU did not wait; the introspector must not reply */
#define VMITRACE_EVENT_CAPTURED 2 /* kvmi_event_breakpoint is followed by vmitrace_captured */
#define VMITRACE_EVENT_TABLE_CAPTURED 4 /* then vmitrace_table_captured (pointer captures) */

/* Then length[0] bytes of the first capture, length[1] of the second (0: unreadable). */
struct vmitrace_captured {
    uint16_t length[VMITRACE_CAPTURES];
    uint32_t padding;
};

/* VMITRACE_SET_CAPTURE_TABLE: 16 bytes + 8 per entry (count <= 2048, 0 removes the table). */
#define VMITRACE_MAX_TABLE_ENTRIES 2048
#define VMITRACE_MAX_TABLE_CAPTURES 4 /* entries per key, and pointer captures per event */
#define VMITRACE_MAX_POINTER_CAPTURE 8192
#define VMITRACE_TABLE_KEYS 512
#define VMITRACE_TABLE_NO_LENGTH 0xff
/* vmitrace_table_entry.flags */
#define VMITRACE_TABLE_STRING 1        /* stop after the first NUL (included) */
#define VMITRACE_TABLE_SIGNED_LENGTH 2 /* the length word is signed; negative: nothing */
#define VMITRACE_TABLE_WORDS32 4       /* pointer and length words: their low 32 bits */
#define VMITRACE_TABLE_INDIRECT 8      /* the address: a pointer in guest memory (offset) */
#define VMITRACE_TABLE_WAIT_IF_CUT 16  /* the hit waits if max_length cut this capture short */
struct vmitrace_capture_table {
    uint64_t gva;
    uint8_t key_word; /* u64 word of the first capture whose low 32 bits select entries */
    uint8_t padding[3];
    uint32_t count;
};

struct vmitrace_table_entry {
    uint16_t key;         /* 0-511 */
    uint8_t pointer_word; /* u64 word of the first capture: the address */
    uint8_t length_word;  /* u64 word bounding the length; VMITRACE_TABLE_NO_LENGTH: none */
    uint16_t max_length;  /* 1-VMITRACE_MAX_POINTER_CAPTURE */
    uint8_t flags;
    uint8_t offset; /* INDIRECT: the address is the pointer (u64; WORDS32: u32) read at the
                       pointer word's value + offset; 0 without it */
};

/* After the captured bytes, with VMITRACE_EVENT_TABLE_CAPTURED: count pointer captures,
 * then the bytes of each, in order. */
struct vmitrace_table_captured {
    uint8_t count; /* 1-VMITRACE_MAX_TABLE_CAPTURES */
    uint8_t padding[7];
};

struct vmitrace_pointer_capture {
    uint64_t gva;    /* where the bytes were read */
    uint16_t length; /* bytes that follow */
    uint8_t faulted; /* 1: the byte at gva + length could not be read */
    uint8_t padding[5];
};

struct vmitrace_delivery {
    uint8_t blocking;
    uint8_t padding[7];
};

/* VMITRACE_GET_VCPU_STATS: what delivering events has cost a vCPU since QEMU started. */
struct vmitrace_get_vcpu_stats {
    uint16_t vcpu;
    uint8_t padding[6];
};

struct vmitrace_vcpu_stats {
    uint64_t events;      /* events delivered */
    uint64_t waits;       /* of which the vCPU waited for a reply */
    uint64_t timeouts;    /* waits that ended without one (timeout, introspector gone) */
    uint64_t event_us;    /* time in delivering events, waits included */
    uint64_t wait_us;     /* of which waiting for replies */
    uint64_t max_wait_us; /* the longest wait */
};

static_assert(sizeof(struct kvmi_msg_hdr) == 8, "hdr");
static_assert(sizeof(struct vmitrace_get_vcpu_stats) == 8, "get stats");
static_assert(sizeof(struct vmitrace_vcpu_stats) == 48, "stats");
static_assert(sizeof(struct kvmi_qemu2introspector) == 96, "q2i");
static_assert(sizeof(struct kvmi_introspector2qemu) == 24, "i2q");
static_assert(sizeof(struct kvm_regs) == 144, "regs");
static_assert(sizeof(struct kvm_segment) == 24, "seg");
static_assert(sizeof(struct kvm_sregs) == 312, "sregs");
static_assert(sizeof(struct kvmi_event_arch) == 536, "arch");
static_assert(sizeof(struct kvmi_event) == 544, "event");
static_assert(sizeof(struct kvmi_event_cr) == 24, "cr");
static_assert(sizeof(struct kvmi_event_msr) == 24, "msr");
static_assert(sizeof(struct kvmi_event_breakpoint) == 16, "bp");
static_assert(sizeof(struct kvmi_get_registers_reply) == 8 + 144 + 312 + 8, "getregs");
static_assert(sizeof(struct kvmi_get_version_reply) == 16, "version");
static_assert(sizeof(struct vmitrace_capture) == 8, "capture");
static_assert(sizeof(struct vmitrace_captured) == 8, "captured");
static_assert(sizeof(struct vmitrace_capture_table) == 16, "capture table");
static_assert(sizeof(struct vmitrace_table_entry) == 8, "table entry");
static_assert(sizeof(struct vmitrace_table_captured) == 8, "table captured");
static_assert(sizeof(struct vmitrace_pointer_capture) == 16, "pointer capture");

/*
 * The extension's messages that may exceed KVMI_MSG_SIZE (the header's u16 size holds
 * them): a full capture table, and a breakpoint event with every capture.
 */
#define VMITRACE_POINTER_CAPTURES_SIZE                                                     \
    (sizeof(struct vmitrace_table_captured) +                                              \
     VMITRACE_MAX_TABLE_CAPTURES *                                                         \
         (sizeof(struct vmitrace_pointer_capture) + VMITRACE_MAX_POINTER_CAPTURE))
#define VMITRACE_TABLE_MSG_SIZE                                                            \
    (sizeof(struct vmitrace_capture_table) +                                               \
     VMITRACE_MAX_TABLE_ENTRIES * sizeof(struct vmitrace_table_entry))
#define VMITRACE_EVENT_MSG_SIZE                                                            \
    (sizeof(struct kvmi_event) + sizeof(struct kvmi_event_breakpoint) +                    \
     sizeof(struct vmitrace_captured) + VMITRACE_CAPTURES * VMITRACE_MAX_CAPTURE +         \
     VMITRACE_POINTER_CAPTURES_SIZE)
static_assert(VMITRACE_TABLE_MSG_SIZE == 16400, "table message");
static_assert(VMITRACE_EVENT_MSG_SIZE == 33920 && VMITRACE_EVENT_MSG_SIZE <= UINT16_MAX,
              "event message");

#endif

/*
 * vmitrace-kvmi: a QEMU TCG plugin that is the host side of KVMI (kvmi-v7).
 *
 * QEMU loads it with
 *   -plugin vmitrace-kvmi.so,socket=PATH,ram=PATH,name=NAME,uuid=UUID[,...]
 * It connects to the introspector's listening socket, performs the
 * qemu2introspector / introspector2qemu handshake and then serves KVMI
 * commands and delivers KVMI events taken from instrumented guest code.
 * docs/qemu-kvmi-plugin.md describes options, threading and limits;
 * docs/kvmi-vendor-extension.md the vmitrace-specific commands.
 *
 * Threads: one reader thread owns the socket's receive side and serves
 * VM-wide commands itself. Commands that need a vCPU's registers are queued
 * to that vCPU and served on its own thread, either while it waits for an
 * event reply or at the start of the next translation block it runs that
 * checks its "attention" flag: every block until all vCPUs have started, then
 * only blocks a running guest passes at every kernel entry and exit (see
 * attention_everywhere); a halted vCPU is answered from the state captured
 * when it halted. Events are sent by the
 * vCPU threads; a vCPU waits for its reply while the others run.
 *
 * The plugin never harms the guest: malformed input and a vanished
 * introspector are logged, the connection is dropped and the guest runs on.
 *
 * Sections, in order: logging, configuration, registers, vCPU state,
 * connection (framing, batching), guest memory (page walk), register access,
 * vCPU-context commands, events, instrumentation (translation callbacks,
 * attention, flushes), commands (reader thread), connection thread, install.
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "kvmi-wire.h"
#include "qemu-plugin-api.h"

VMITRACE_EXPORT int qemu_plugin_version = VMITRACE_QEMU_PLUGIN_API_VERSION;

#define MAX_VCPUS 64
#define MAX_PENDING_PAUSES 16
#define MAX_KNOWN_MSRS 256
#define MAX_QUEUED_COMMANDS 64
#define MAX_HANDSHAKE_BYTES (64 * 1024)
/* The largest message the introspector may send: a full capture table. */
#define MAX_INCOMING MAX(KVMI_MSG_SIZE, VMITRACE_TABLE_MSG_SIZE)
#define MAX_SITES 100000 /* instrumented instructions remembered between flushes */
#define UNHOOK_WAIT_MS 2000
/* Non-blocking events are batched: one write wakes the introspector for many. */
#define BATCH_FLUSH_BYTES (64 * 1024)
#define BATCH_FLUSH_MS 5
/* While vCPUs wait for event replies they read the socket themselves (see
 * read_as_vcpu); the reader thread stays parked until none has for this long. */
#define DIRECT_PARK_US 2000
#define DIRECT_SLICE_MS 1
#define MAX_SPIN_US 1000

/* MSRs that QEMU exposes as registers, and architectural bits used below. */
#define MSR_EFER 0xc0000080u
#define MSR_STAR 0xc0000081u
#define MSR_LSTAR 0xc0000082u
#define MSR_CSTAR 0xc0000083u
#define MSR_FS_BASE 0xc0000100u
#define MSR_GS_BASE 0xc0000101u
#define MSR_KERNEL_GS_BASE 0xc0000102u
#define MSR_SYSENTER_CS 0x174u
#define MSR_SYSENTER_ESP 0x175u
#define MSR_SYSENTER_EIP 0x176u
#define MSR_PAT 0x277u
#define PAT_RESET_VALUE 0x0007040600070406ull
#define CR0_PE (1ull << 0)
#define CR0_PG (1ull << 31)
#define CR4_PSE (1ull << 4)
#define CR4_PAE (1ull << 5)
#define CR4_LA57 (1ull << 12)
#define CR4_PCIDE (1ull << 17)
#define EFER_LMA (1ull << 10)
#define CR3_NOFLUSH (1ull << 63)
#define PTE_PRESENT 1ull
#define PTE_PS (1ull << 7)
#define PTE_ADDR 0x000ffffffffff000ull
#define UNMAPPED_GVA (~0ull)

/* ------------------------------------------------------------------ logging */

static bool verbose;

static void logmsg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void logmsg(const char *fmt, ...)
{
    char line[512];
    va_list ap;
    int n = snprintf(line, sizeof(line), "vmitrace-kvmi: ");
    va_start(ap, fmt);
    vsnprintf(line + n, sizeof(line) - n, fmt, ap);
    va_end(ap);
    fprintf(stderr, "%s\n", line);
}

#define debug(...) do { if (verbose) logmsg(__VA_ARGS__); } while (0)

/* ------------------------------------------------------------ configuration */

static struct {
    const char *socket_path;
    const char *ram_path;
    char name[64];
    uint8_t uuid[16];
    bool reconnect;
    bool hold;
    unsigned reply_timeout_ms;
    unsigned spin_us;
    unsigned connect_timeout_ms;
    unsigned hold_timeout_ms;
    const char *cookie;
} cfg = {
    .reply_timeout_ms = 10000,
    .spin_us = 100,
    .connect_timeout_ms = 30000,
    .hold_timeout_ms = 60000,
};

static qemu_plugin_id_t plugin_id;
static unsigned vcpu_count;
static int64_t start_time;

/* Guest RAM shared with QEMU: guest-physical address = file offset. */
static uint8_t *ram;
static uint64_t ram_size;

/* --------------------------------------------------------------- registers */

enum reg {
    R_RAX, R_RBX, R_RCX, R_RDX, R_RSI, R_RDI, R_RSP, R_RBP,
    R_R8, R_R9, R_R10, R_R11, R_R12, R_R13, R_R14, R_R15,
    R_RIP, R_EFLAGS, R_CS, R_SS, R_DS, R_ES, R_FS, R_GS,
    R_FS_BASE, R_GS_BASE, R_K_GS_BASE,
    R_CR0, R_CR2, R_CR3, R_CR4, R_CR8, R_EFER,
    R_COUNT
};

static const char *const reg_names[R_COUNT] = {
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
    "rip", "eflags", "cs", "ss", "ds", "es", "fs", "gs",
    "fs_base", "gs_base", "k_gs_base",
    "cr0", "cr2", "cr3", "cr4", "cr8", "efer",
};

/* x86 register number (ModRM/REX encoding) to our register ids. */
static const enum reg gpr_by_number[16] = {
    R_RAX, R_RCX, R_RDX, R_RBX, R_RSP, R_RBP, R_RSI, R_RDI,
    R_R8, R_R9, R_R10, R_R11, R_R12, R_R13, R_R14, R_R15,
};

static struct qemu_plugin_register *reg_handles[R_COUNT];
static GOnce reg_handles_once = G_ONCE_INIT;

/* --------------------------------------------------------------- vCPU state */

struct msr_value {
    uint32_t index;
    uint64_t value;
};

/* A vCPU's registers, captured on its own thread. */
struct cpu_state {
    uint8_t mode;
    struct kvm_regs regs;
    struct kvm_sregs sregs;
    uint64_t k_gs_base;
};

/* A command that needs a vCPU's context, queued to that vCPU. */
struct queued_command {
    unsigned generation;
    struct kvmi_msg_hdr hdr;
    uint8_t payload[];
};

struct vcpu {
    unsigned index;
    bool present;
    bool started;
    GByteArray *regbuf;
    uint8_t *rx; /* message buffer for reading the socket while in an event */
    uint8_t *pointers; /* a hit's pointer captures (VMITRACE_POINTER_CAPTURES_SIZE) */
    /* Actual minus translated address of the running block (see on_site_block). */
    uint64_t rip_delta;
    /* While in an event: its rip (the rip register is stale inside a block). */
    bool in_event;
    uint64_t event_rip;

    /* Introspector-controlled, per connection (read lock-free). */
    uint32_t events;   /* bit per enabled vCPU event */
    uint32_t crs;      /* bit per enabled control register */
    uint8_t msrs_low[0x2000 / 8];  /* MSRs 0 .. 0x1fff */
    uint8_t msrs_high[0x2000 / 8]; /* MSRs 0xc0000000 .. 0xc0001fff */
    int pending_pauses;

    /* Event wait, command queue, idle snapshot and written MSRs, under lock. */
    GMutex lock;
    GCond cond;
    bool waiting;
    bool replied;
    uint32_t wait_seq;
    uint8_t reply_action;
    GQueue commands;
    bool idle;                  /* halted: idle_state is its current state */
    struct cpu_state idle_state;
    struct msr_value known_msrs[MAX_KNOWN_MSRS]; /* last values the guest wrote */
    unsigned n_known_msrs;

    /* Written by the vCPU's thread only, read by the reader (VMITRACE_GET_VCPU_STATS). */
    struct vmitrace_vcpu_stats stats;
};

static struct vcpu vcpus[MAX_VCPUS];

/* Per-vCPU attention flag, read inline at the start of the blocks that check it. */
static struct qemu_plugin_scoreboard *attention_board;
/*
 * Which blocks check the flag. A check in every block slows the guest down by
 * about 15% (measured: a fork/exec shell loop, plugin connected and idle, 1.17x
 * the time without the plugin with checks everywhere, 1.02x without any). So
 * checks are everywhere only until every vCPU has started (its first block
 * sends CREATE_VCPU and holds it for the introspector), and again while a new
 * vCPU appears. Otherwise only blocks holding an attention instruction check:
 * those a running guest passes at every kernel entry and exit and before it
 * idles (swapgs, iret, sysret, sysexit, hlt: at least at every timer tick),
 * and blocks with a site. A vCPU leaving an event also issues a wanted flush.
 */
static bool attention_everywhere = true;

static void set_attention(unsigned vcpu)
{
    uint64_t *flag = qemu_plugin_scoreboard_find(attention_board, vcpu);
    __atomic_store_n(flag, 1, __ATOMIC_RELEASE);
}

static void clear_attention(unsigned vcpu)
{
    uint64_t *flag = qemu_plugin_scoreboard_find(attention_board, vcpu);
    __atomic_store_n(flag, 0, __ATOMIC_RELEASE);
}

static void set_attention_all(void)
{
    for (unsigned i = 0; i < MAX_VCPUS; i++) {
        if (__atomic_load_n(&vcpus[i].present, __ATOMIC_ACQUIRE)) {
            set_attention(i);
        }
    }
}

/* -------------------------------------------------------------- connection */

static struct {
    GMutex write_lock;      /* serializes writes; guards fd and generation */
    int fd;                 /* -1 when not connected */
    unsigned generation;    /* bumped at every connect and disconnect */
    GCond changed;          /* signalled (with write_lock) on connect/disconnect */
    bool blocking;          /* event delivery mode (vendor extension) */
    uint32_t vm_events;     /* enabled VM events: UNHOOK, CREATE_VCPU */
    bool exiting;
    GByteArray *batch;      /* non-blocking events not written yet (under write_lock) */
    gint64 batch_since;     /* monotonic time of the oldest one */
} conn = { .fd = -1, .blocking = true };

/*
 * Reading the socket. Normally the reader thread reads it. A vCPU that waits
 * for an event reply reads it itself instead, so the reply wakes the vCPU
 * directly: going through the reader thread costs a second wake-up per event,
 * tens of microseconds on a busy host. While events flow the reader thread
 * stays parked; a command that arrives meanwhile is served by the next waiting
 * vCPU, or by the reader within DIRECT_PARK_US of the last wait.
 */
static GMutex read_lock;    /* held while one whole message is read and dispatched */
static int direct_readers;  /* vCPUs waiting for an event reply */
static gint64 last_direct;  /* when the last one stopped waiting (monotonic us) */
static bool read_broken;    /* a vCPU found the connection broken: reader, clean up */

static uint32_t event_seq;

/* Instrumentation breakpoints, VM-wide by guest virtual address. */
static GMutex bp_lock;
/*
 * A breakpoint's capture table (VMITRACE_SET_CAPTURE_TABLE), its entries grouped by key.
 * Reference counted (g_atomic_rc_box): a hit holds it while the rule may be replaced.
 */
struct capture_table {
    size_t min_capture; /* first-capture bytes holding every word the table reads */
    uint8_t key_word;
    uint8_t count[VMITRACE_TABLE_KEYS];  /* entries per key */
    uint16_t first[VMITRACE_TABLE_KEYS]; /* index of the key's first entry */
    struct vmitrace_table_entry entries[];
};
/*
 * How a breakpoint's hits are delivered: as the connection says, or (run_on)
 * without waiting for a reply unless a register or a captured word holds one
 * of a few values (or a value in a 512-bit set); and what guest memory each
 * hit carries.
 */
struct bp_rule {
    uint64_t gva; /* the hash key points here */
    bool run_on;
    uint8_t block_reg;
    uint8_t count;
    uint8_t block_flags;
    uint8_t differ_words[2];
    uint32_t block_values[VMITRACE_MAX_BLOCK_WORDS]; /* DIFFER_REVERSED: two bitmaps */
    struct vmitrace_capture captures[VMITRACE_CAPTURES]; /* copied into each hit's event */
    struct capture_table *table; /* NULL: none; one reference held by the rule */
};
static_assert(offsetof(struct bp_rule, gva) == 0, "the hash key frees the rule");
static GHashTable *breakpoints; /* &rule->gva -> struct bp_rule * */
static unsigned bp_count;       /* read lock-free at translation time */

/* Translation flushes (qemu_plugin_reset): wanted, and one in flight. */
static GMutex flush_lock;
static bool flush_wanted;
static bool reset_inflight;

static bool write_all(int fd, const void *buf, size_t len)
{
    const uint8_t *p = buf;
    while (len) {
        ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            return false;
        }
        p += n;
        len -= (size_t)n;
    }
    return true;
}

/* Read len bytes; with a deadline (monotonic us, 0: none) give up when it passes. */
static bool read_all(int fd, void *buf, size_t len, gint64 deadline)
{
    uint8_t *p = buf;
    while (len) {
        /* With a deadline, wait in poll() only when nothing is there yet: a message
         * usually arrives whole, and this runs on a waiting vCPU's critical path. */
        ssize_t n = recv(fd, p, len, deadline ? MSG_DONTWAIT : 0);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0 && deadline && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            struct pollfd pfd = { .fd = fd, .events = POLLIN };
            gint64 left = deadline - g_get_monotonic_time();
            int ready = left > 0 ? poll(&pfd, 1, (int)((left + 999) / 1000)) : 0;
            if (ready <= 0 && !(ready < 0 && errno == EINTR)) {
                return false;
            }
            continue;
        }
        if (n <= 0) {
            return false;
        }
        p += n;
        len -= (size_t)n;
    }
    return true;
}

/* Write the batched events (with write_lock held); false on a write error. */
static bool flush_batch_locked(void)
{
    bool ok = true;
    if (conn.batch->len && conn.fd >= 0) {
        ok = write_all(conn.fd, conn.batch->data, conn.batch->len);
    }
    g_byte_array_set_size(conn.batch, 0);
    return ok;
}

/* Reader thread: write batched events that waited BATCH_FLUSH_MS (or all: max_age 0). */
static void flush_batch(gint64 max_age_us)
{
    g_mutex_lock(&conn.write_lock);
    if (conn.batch->len && g_get_monotonic_time() - conn.batch_since >= max_age_us &&
        !flush_batch_locked()) {
        logmsg("write to introspector failed: %s; dropping the connection", strerror(errno));
        shutdown(conn.fd, SHUT_RDWR);
    }
    g_mutex_unlock(&conn.write_lock);
}

/*
 * Send one message (header + up to three payload parts) with one write.
 * generation != 0 restricts the send to that connection. batched: a
 * non-blocking event, which may wait up to BATCH_FLUSH_MS to go out with
 * others; anything else first writes what is batched, so order is kept.
 * On a write error the socket is shut down; the reader thread then cleans up.
 */
static bool send_message(unsigned generation, uint16_t id, uint32_t seq, bool batched,
                         const void *a, size_t alen, const void *b, size_t blen,
                         const void *c, size_t clen)
{
    size_t total = alen + blen + clen;
    size_t max = id == KVMI_EVENT ? VMITRACE_EVENT_MSG_SIZE : KVMI_MSG_SIZE;
    uint8_t stackbuf[1024];
    uint8_t *buf = total + 8 <= sizeof(stackbuf) ? stackbuf : g_malloc(total + 8);
    struct kvmi_msg_hdr hdr = { .id = id, .size = (uint16_t)total, .seq = seq };
    bool ok = false;

    if (total > max) {
        logmsg("refusing to send an oversized message (id %u, %zu bytes)", id, total);
        goto out;
    }
    memcpy(buf, &hdr, 8);
    if (alen) memcpy(buf + 8, a, alen);
    if (blen) memcpy(buf + 8 + alen, b, blen);
    if (clen) memcpy(buf + 8 + alen + blen, c, clen);

    g_mutex_lock(&conn.write_lock);
    if (conn.fd >= 0 && (generation == 0 || generation == conn.generation)) {
        if (batched) {
            gint64 now = g_get_monotonic_time();
            if (conn.batch->len == 0) {
                conn.batch_since = now;
            }
            g_byte_array_append(conn.batch, buf, total + 8);
            ok = conn.batch->len < BATCH_FLUSH_BYTES &&
                 now - conn.batch_since < BATCH_FLUSH_MS * 1000
                     ? true
                     : flush_batch_locked();
        } else {
            ok = flush_batch_locked() && write_all(conn.fd, buf, total + 8);
        }
        if (!ok) {
            logmsg("write to introspector failed: %s; dropping the connection", strerror(errno));
            shutdown(conn.fd, SHUT_RDWR);
        }
    }
    g_mutex_unlock(&conn.write_lock);
out:
    if (buf != stackbuf) {
        g_free(buf);
    }
    return ok;
}

static void send_reply(unsigned generation, const struct kvmi_msg_hdr *req, int err,
                       const void *data, size_t len)
{
    struct kvmi_error_code ec = { .err = err };
    send_message(generation, req->id, req->seq, false, &ec, sizeof(ec), err ? NULL : data,
                 err ? 0 : len, NULL, 0);
}

static unsigned current_generation(void)
{
    g_mutex_lock(&conn.write_lock);
    unsigned g = conn.generation;
    g_mutex_unlock(&conn.write_lock);
    return g;
}

static bool connected(void)
{
    return __atomic_load_n(&conn.fd, __ATOMIC_ACQUIRE) >= 0;
}

/* ------------------------------------------------------------ guest memory */

static bool ram_read(uint64_t gpa, void *dst, size_t len)
{
    if (!ram || gpa >= ram_size || len > ram_size - gpa) {
        return false;
    }
    memcpy(dst, ram + gpa, len);
    return true;
}

/* Guest page walk over shared RAM: 32-bit, PAE, 4- and 5-level paging. */
static uint64_t translate_gva(uint64_t cr0, uint64_t cr3, uint64_t cr4, uint64_t efer,
                              uint64_t gva)
{
    uint64_t entry, table;

    if (!(cr0 & CR0_PG)) {
        return gva;
    }
    if (efer & EFER_LMA) {
        int levels = (cr4 & CR4_LA57) ? 5 : 4;
        table = cr3 & PTE_ADDR;
        for (int level = levels; level >= 1; level--) {
            unsigned shift = 12 + 9 * (level - 1);
            uint64_t idx = (gva >> shift) & 511;
            if (!ram_read(table + idx * 8, &entry, 8) || !(entry & PTE_PRESENT)) {
                return UNMAPPED_GVA;
            }
            if (level == 1 || (level <= 3 && (entry & PTE_PS))) {
                uint64_t page = 1ull << shift;
                return ((entry & PTE_ADDR) & ~(page - 1)) | (gva & (page - 1));
            }
            table = entry & PTE_ADDR;
        }
        return UNMAPPED_GVA;
    }
    gva &= 0xffffffffull;
    if (cr4 & CR4_PAE) {
        table = cr3 & 0xffffffe0ull;
        if (!ram_read(table + ((gva >> 30) & 3) * 8, &entry, 8) || !(entry & PTE_PRESENT)) {
            return UNMAPPED_GVA;
        }
        table = entry & PTE_ADDR;
        if (!ram_read(table + ((gva >> 21) & 511) * 8, &entry, 8) || !(entry & PTE_PRESENT)) {
            return UNMAPPED_GVA;
        }
        if (entry & PTE_PS) {
            return ((entry & PTE_ADDR) & ~0x1fffffull) | (gva & 0x1fffff);
        }
        table = entry & PTE_ADDR;
        if (!ram_read(table + ((gva >> 12) & 511) * 8, &entry, 8) || !(entry & PTE_PRESENT)) {
            return UNMAPPED_GVA;
        }
        return (entry & PTE_ADDR) | (gva & 0xfff);
    }
    uint32_t e32;
    if (!ram_read((cr3 & 0xfffff000ull) + ((gva >> 22) & 1023) * 4, &e32, 4) || !(e32 & 1)) {
        return UNMAPPED_GVA;
    }
    if ((e32 & PTE_PS) && (cr4 & CR4_PSE)) {
        return (e32 & 0xffc00000ull) | (gva & 0x3fffff);
    }
    if (!ram_read((e32 & 0xfffff000ull) + ((gva >> 12) & 1023) * 4, &e32, 4) || !(e32 & 1)) {
        return UNMAPPED_GVA;
    }
    return (e32 & 0xfffff000ull) | (gva & 0xfff);
}

/* ------------------------------------------------- register access (vCPU) */

static gpointer lookup_register_handles(gpointer unused)
{
    GArray *regs = qemu_plugin_get_registers();
    for (guint i = 0; regs && i < regs->len; i++) {
        qemu_plugin_reg_descriptor *d = &g_array_index(regs, qemu_plugin_reg_descriptor, i);
        for (int r = 0; r < R_COUNT; r++) {
            if (d->name && strcmp(d->name, reg_names[r]) == 0) {
                reg_handles[r] = d->handle;
            }
        }
    }
    for (int r = 0; r < R_COUNT; r++) {
        if (!reg_handles[r]) {
            logmsg("QEMU does not expose register %s; it reads as 0", reg_names[r]);
        }
    }
    if (regs) {
        g_array_free(regs, TRUE);
    }
    return NULL;
}

static uint64_t read_reg(struct vcpu *v, enum reg r)
{
    uint64_t value = 0;
    if (!reg_handles[r]) {
        return 0;
    }
    g_byte_array_set_size(v->regbuf, 0);
    int n = qemu_plugin_read_register(reg_handles[r], v->regbuf);
    if (n > 0) {
        memcpy(&value, v->regbuf->data, MIN((size_t)n, sizeof(value))); /* x86: little endian */
    }
    return value;
}

/* Last value the guest wrote to MSR index (PAT: its reset value until written). */
static bool written_msr(struct vcpu *v, uint32_t index, uint64_t *value)
{
    bool found = false;
    g_mutex_lock(&v->lock);
    for (unsigned i = 0; i < v->n_known_msrs; i++) {
        if (v->known_msrs[i].index == index) {
            *value = v->known_msrs[i].value;
            found = true;
            break;
        }
    }
    g_mutex_unlock(&v->lock);
    if (!found && index == MSR_PAT) {
        *value = PAT_RESET_VALUE;
        found = true;
    }
    return found;
}

static void remember_msr(struct vcpu *v, uint32_t index, uint64_t value)
{
    g_mutex_lock(&v->lock);
    unsigned i = 0;
    while (i < v->n_known_msrs && v->known_msrs[i].index != index) {
        i++;
    }
    if (i < MAX_KNOWN_MSRS) {
        v->known_msrs[i] = (struct msr_value){ index, value };
        v->n_known_msrs = MAX(v->n_known_msrs, i + 1);
    }
    g_mutex_unlock(&v->lock);
}

/* An MSR's value in a captured state: live for those QEMU exposes as registers. */
static bool state_msr(struct vcpu *v, const struct cpu_state *st, uint32_t index,
                      uint64_t *value)
{
    switch (index) {
    case MSR_EFER: *value = st->sregs.efer; return true;
    case MSR_FS_BASE: *value = st->sregs.fs.base; return true;
    case MSR_GS_BASE: *value = st->sregs.gs.base; return true;
    case MSR_KERNEL_GS_BASE: *value = st->k_gs_base; return true;
    }
    return written_msr(v, index, value);
}

/* The same, read live on the vCPU's thread. */
static bool live_msr(struct vcpu *v, uint32_t index, uint64_t *value)
{
    switch (index) {
    case MSR_EFER: *value = read_reg(v, R_EFER); return true;
    case MSR_FS_BASE: *value = read_reg(v, R_FS_BASE); return true;
    case MSR_GS_BASE: *value = read_reg(v, R_GS_BASE); return true;
    case MSR_KERNEL_GS_BASE: *value = read_reg(v, R_K_GS_BASE); return true;
    }
    return written_msr(v, index, value);
}

static uint64_t state_msr_or_zero(struct vcpu *v, const struct cpu_state *st, uint32_t index)
{
    uint64_t value = 0;
    state_msr(v, st, index, &value);
    return value;
}

static uint8_t cpu_mode(uint64_t cr0, uint64_t efer, uint64_t cs)
{
    if (efer & EFER_LMA) {
        return cs == 0x23 ? 4 : 8; /* 0x23: Linux's 32-bit compat user CS */
    }
    return (cr0 & CR0_PE) ? 4 : 2;
}

static void fill_segment(struct kvm_segment *s, uint64_t selector, uint64_t base, bool code,
                         uint8_t mode)
{
    s->selector = (uint16_t)selector;
    s->base = base;
    s->limit = 0xffffffff;
    s->type = code ? 11 : 3;
    s->present = 1;
    s->s = 1;
    s->dpl = selector & 3;
    s->l = code && mode == 8;
    s->db = mode == 4;
    s->g = 1;
}

/* Full architectural state as QEMU exposes it; rip is the instruction's address. */
static void capture_state(struct vcpu *v, uint64_t rip, struct cpu_state *st)
{
    struct kvm_regs *regs = &st->regs;
    struct kvm_sregs *sregs = &st->sregs;

    memset(st, 0, sizeof(*st));
    for (int r = R_RAX; r <= R_R15; r++) {
        ((uint64_t *)regs)[r] = read_reg(v, (enum reg)r);
    }
    regs->rip = rip;
    regs->rflags = read_reg(v, R_EFLAGS);
    sregs->cr0 = read_reg(v, R_CR0);
    sregs->cr2 = read_reg(v, R_CR2);
    sregs->cr3 = read_reg(v, R_CR3);
    sregs->cr4 = read_reg(v, R_CR4);
    sregs->cr8 = read_reg(v, R_CR8);
    sregs->efer = read_reg(v, R_EFER);
    uint64_t cs = read_reg(v, R_CS);
    uint8_t mode = cpu_mode(sregs->cr0, sregs->efer, cs);
    fill_segment(&sregs->cs, cs, 0, true, mode);
    fill_segment(&sregs->ds, read_reg(v, R_DS), 0, false, mode);
    fill_segment(&sregs->es, read_reg(v, R_ES), 0, false, mode);
    fill_segment(&sregs->ss, read_reg(v, R_SS), 0, false, mode);
    fill_segment(&sregs->fs, read_reg(v, R_FS), read_reg(v, R_FS_BASE), false, mode);
    fill_segment(&sregs->gs, read_reg(v, R_GS), read_reg(v, R_GS_BASE), false, mode);
    st->mode = mode;
    st->k_gs_base = read_reg(v, R_K_GS_BASE);
}

static void fill_arch(struct vcpu *v, uint64_t rip, struct kvmi_event_arch *arch)
{
    struct cpu_state st;

    capture_state(v, rip, &st);
    memset(arch, 0, sizeof(*arch));
    arch->mode = st.mode;
    arch->regs = st.regs;
    arch->sregs = st.sregs;
    arch->msrs.sysenter_cs = state_msr_or_zero(v, &st, MSR_SYSENTER_CS);
    arch->msrs.sysenter_esp = state_msr_or_zero(v, &st, MSR_SYSENTER_ESP);
    arch->msrs.sysenter_eip = state_msr_or_zero(v, &st, MSR_SYSENTER_EIP);
    arch->msrs.efer = st.sregs.efer;
    arch->msrs.star = state_msr_or_zero(v, &st, MSR_STAR);
    arch->msrs.lstar = state_msr_or_zero(v, &st, MSR_LSTAR);
    arch->msrs.cstar = state_msr_or_zero(v, &st, MSR_CSTAR);
    arch->msrs.pat = state_msr_or_zero(v, &st, MSR_PAT);
    arch->msrs.shadow_gs = st.k_gs_base;
}

/* --------------------------------------------------- vCPU-context commands */

/* Answer a vCPU-context command from a captured state (any thread). */
static void serve_from_state(struct vcpu *v, const struct cpu_state *st, unsigned generation,
                             const struct kvmi_msg_hdr *hdr, const uint8_t *payload)
{
    const uint8_t *body = payload + sizeof(struct kvmi_vcpu_hdr);

    if (hdr->id == KVMI_VCPU_TRANSLATE_GVA) {
        const struct kvmi_translate_gva *req = (const void *)body;
        uint64_t gpa = translate_gva(st->sregs.cr0, st->sregs.cr3, st->sregs.cr4,
                                     st->sregs.efer, req->gva);
        send_reply(generation, hdr, 0, &gpa, sizeof(gpa));
        return;
    }
    /* KVMI_GET_REGISTERS (sizes were checked when the command arrived) */
    const struct kvmi_get_registers *req = (const void *)body;
    const uint32_t *idx = (const void *)(req + 1);
    size_t reply_len = sizeof(struct kvmi_get_registers_reply) +
                       (size_t)req->nmsrs * sizeof(struct kvm_msr_entry);
    struct kvmi_get_registers_reply *rpl = g_malloc0(reply_len);
    struct kvm_msr_entry *entries = (void *)(rpl + 1);
    int err = 0;

    rpl->mode = st->mode;
    rpl->regs = st->regs;
    rpl->sregs = st->sregs;
    rpl->nmsrs = req->nmsrs;
    for (unsigned i = 0; i < req->nmsrs; i++) {
        entries[i].index = idx[i];
        if (!state_msr(v, st, idx[i], &entries[i].data)) {
            err = -KVM_EINVAL; /* an MSR this host cannot read */
        }
    }
    send_reply(generation, hdr, err, rpl, reply_len);
    g_free(rpl);
}

/* Serve commands queued for this vCPU. Called on the vCPU's thread. */
static void serve_queued_commands(struct vcpu *v)
{
    for (;;) {
        g_mutex_lock(&v->lock);
        struct queued_command *qc = g_queue_pop_head(&v->commands);
        g_mutex_unlock(&v->lock);
        if (!qc) {
            return;
        }
        if (qc->generation == current_generation()) {
            struct cpu_state st;
            /* Inside a block QEMU's rip is stale: in an event, use the event's. */
            capture_state(v, v->in_event ? v->event_rip : read_reg(v, R_RIP), &st);
            serve_from_state(v, &st, qc->generation, &qc->hdr, qc->payload);
        }
        g_free(qc);
    }
}

/* ------------------------------------------------------------------ events */

enum read_result { READ_NOTHING, READ_DONE, READ_BUSY, READ_BROKEN };
static enum read_result read_as_vcpu(struct vcpu *v, unsigned generation, int wait_ms);
static void flush_if_wanted(void);

static void crash_vm(unsigned vcpu)
{
    logmsg("introspector replied CRASH on vCPU %u: stopping the VM", vcpu);
    kill(getpid(), SIGTERM); /* QEMU shuts the VM down */
}

static void stat_add(uint64_t *counter, uint64_t n)
{
    __atomic_store_n(counter, __atomic_load_n(counter, __ATOMIC_RELAXED) + n, __ATOMIC_RELAXED);
}

/* Count a delivered event that began at `start`; `wait_start` 0: the vCPU did not wait. */
static void count_event(struct vcpu *v, gint64 start, gint64 wait_start, bool replied)
{
    gint64 now = g_get_monotonic_time();
    stat_add(&v->stats.events, 1);
    stat_add(&v->stats.event_us, (uint64_t)(now - start));
    if (wait_start) {
        uint64_t waited = (uint64_t)(now - wait_start);
        stat_add(&v->stats.waits, 1);
        stat_add(&v->stats.wait_us, waited);
        stat_add(&v->stats.timeouts, !replied);
        if (waited > __atomic_load_n(&v->stats.max_wait_us, __ATOMIC_RELAXED)) {
            __atomic_store_n(&v->stats.max_wait_us, waited, __ATOMIC_RELAXED);
        }
    }
}

static gint64 deadline_after(unsigned ms)
{
    return g_get_monotonic_time() + (gint64)ms * 1000;
}

/*
 * Send an event from vCPU v and, with blocking delivery (and no_wait false),
 * wait for its reply while serving commands for this vCPU. Returns the action
 * to take.
 */
static uint8_t deliver_event(struct vcpu *v, uint8_t event_id, uint64_t rip, bool have_arch,
                             const void *payload, size_t payload_len, const void *tail,
                             size_t tail_len, unsigned timeout_ms, bool no_wait, uint8_t flags)
{
    struct kvmi_event ev = { .size = sizeof(ev), .vcpu = (uint16_t)v->index, .event = event_id };
    uint32_t seq = __atomic_add_fetch(&event_seq, 1, __ATOMIC_RELAXED);
    unsigned generation = current_generation();
    bool conn_blocking = __atomic_load_n(&conn.blocking, __ATOMIC_ACQUIRE);
    bool blocking = conn_blocking && !no_wait;
    uint8_t action = KVMI_EVENT_ACTION_CONTINUE;

    if (!connected()) {
        return action;
    }
    gint64 start = g_get_monotonic_time();
    if (have_arch) {
        fill_arch(v, rip, &ev.arch);
    }
    ev.flags = flags | (blocking ? 0 : VMITRACE_EVENT_NO_REPLY);
    if (blocking) {
        g_mutex_lock(&v->lock);
        v->waiting = true;
        v->replied = false;
        v->wait_seq = seq;
        g_mutex_unlock(&v->lock);
    }
    /* A run-on breakpoint's hit goes out at once: the introspector works while we run. */
    if (!send_message(generation, KVMI_EVENT, seq, !conn_blocking, &ev, sizeof(ev), payload,
                      payload_len, tail, tail_len)) {
        blocking = false;
    }
    if (!blocking) {
        g_mutex_lock(&v->lock);
        v->waiting = false;
        g_mutex_unlock(&v->lock);
        count_event(v, start, 0, false);
        return action;
    }

    gint64 wait_start = g_get_monotonic_time();
    gint64 deadline = wait_start + (gint64)timeout_ms * 1000;
    v->in_event = true;
    v->event_rip = rip;
    __atomic_add_fetch(&direct_readers, 1, __ATOMIC_ACQ_REL);
    g_mutex_lock(&v->lock);
    while (!v->replied) {
        if (!g_queue_is_empty(&v->commands)) {
            g_mutex_unlock(&v->lock);
            serve_queued_commands(v);
            g_mutex_lock(&v->lock);
            continue;
        }
        /* The reader bumps the generation, then wakes us under v->lock. */
        if (__atomic_load_n(&conn.generation, __ATOMIC_ACQUIRE) != generation) {
            break;
        }
        gint64 now = g_get_monotonic_time();
        if (now >= deadline) {
            break;
        }
        /* Read the socket ourselves; if another vCPU does, it wakes us. */
        g_mutex_unlock(&v->lock);
        enum read_result got = read_as_vcpu(v, generation, DIRECT_SLICE_MS);
        g_mutex_lock(&v->lock);
        if (got == READ_BROKEN) {
            break;
        }
        if (got == READ_BUSY && !v->replied && g_queue_is_empty(&v->commands)) {
            g_cond_wait_until(&v->cond, &v->lock,
                              MIN(deadline, now + DIRECT_SLICE_MS * 1000));
        }
    }
    bool replied = v->replied;
    action = v->reply_action;
    v->waiting = false;
    g_mutex_unlock(&v->lock);
    __atomic_store_n(&last_direct, g_get_monotonic_time(), __ATOMIC_RELEASE);
    __atomic_sub_fetch(&direct_readers, 1, __ATOMIC_ACQ_REL);
    v->in_event = false;
    count_event(v, start, wait_start, replied);
    /* Commands served meanwhile may have changed breakpoints or code: take effect now,
     * not at the next block that checks attention. */
    flush_if_wanted();

    if (!replied) {
        if (current_generation() == generation) {
            logmsg("no reply to event %u (seq %u) on vCPU %u within %u ms: continuing",
                   event_id, seq, v->index, timeout_ms);
        } else {
            debug("introspector gone while vCPU %u waited for seq %u: continuing", v->index, seq);
        }
        return KVMI_EVENT_ACTION_CONTINUE;
    }
    if (action == KVMI_EVENT_ACTION_CRASH) {
        crash_vm(v->index);
    } else if (action > KVMI_EVENT_ACTION_CRASH) {
        logmsg("unknown event action %u on vCPU %u: continuing", action, v->index);
        action = KVMI_EVENT_ACTION_CONTINUE;
    }
    return action;
}

static uint8_t send_event(struct vcpu *v, uint8_t event_id, uint64_t rip, bool have_arch,
                          const void *payload, size_t payload_len, unsigned timeout_ms)
{
    return deliver_event(v, event_id, rip, have_arch, payload, payload_len, NULL, 0, timeout_ms,
                         false, 0);
}

static bool event_enabled(struct vcpu *v, unsigned event_id)
{
    return __atomic_load_n(&v->events, __ATOMIC_RELAXED) & (1u << event_id);
}

/* -------------------------------------------------------- instrumentation */

enum site_kind { SITE_CR_WRITE = 1, SITE_WRMSR, SITE_HYPERCALL, SITE_INT3, SITE_BREAKPOINT };

/* One instrumented instruction; interned so retranslation allocates nothing. */
struct site {
    uint64_t gva;
    uint8_t kind;
    uint8_t len;
    uint8_t cr;  /* SITE_CR_WRITE: control register */
    uint8_t src; /* SITE_CR_WRITE: source GPR number */
};

static GMutex sites_lock;
static GHashTable *sites;

static guint site_hash(gconstpointer p)
{
    const struct site *s = p;
    return g_int64_hash(&s->gva) ^ (s->kind * 0x9e3779b1u) ^ (s->cr << 8) ^ (s->src << 16) ^
           (s->len << 24);
}

static gboolean site_equal(gconstpointer a, gconstpointer b)
{
    const struct site *x = a, *y = b;
    return x->gva == y->gva && x->kind == y->kind && x->len == y->len && x->cr == y->cr &&
           x->src == y->src;
}

static void request_flush(void);

static struct site *intern_site(struct site key)
{
    g_mutex_lock(&sites_lock);
    struct site *s = g_hash_table_lookup(sites, &key);
    if (!s) {
        s = g_memdup2(&key, sizeof(key));
        g_hash_table_add(sites, s);
        if (g_hash_table_size(sites) == MAX_SITES) {
            request_flush(); /* which frees them all (on_reset_done) */
        }
    }
    g_mutex_unlock(&sites_lock);
    return s;
}

/* Index of the opcode of instruction b[0..n), after its legacy and REX prefixes. */
static size_t opcode_index(const uint8_t *b, size_t n, bool *lock, uint8_t *rex)
{
    size_t i = 0;

    *lock = false;
    *rex = 0;
    while (i < n && i < 14) {
        uint8_t p = b[i];
        if (p == 0xf0) {
            *lock = true;
        } else if (!(p == 0x66 || p == 0x67 || p == 0xf2 || p == 0xf3 || p == 0x2e ||
                     p == 0x36 || p == 0x3e || p == 0x26 || p == 0x64 || p == 0x65)) {
            break;
        }
        i++;
    }
    if (i < n && (b[i] & 0xf0) == 0x40) {
        *rex = b[i++];
    }
    return i;
}

/* Decode the instructions the plugin reports on. Returns a site kind or 0. */
static int classify(const uint8_t *b, size_t n, uint8_t *cr, uint8_t *src)
{
    bool lock;
    uint8_t rex;
    size_t i = opcode_index(b, n, &lock, &rex);

    if (i >= n) {
        return 0;
    }
    if (b[i] == 0xcc || (b[i] == 0xcd && i + 1 < n && b[i + 1] == 3)) {
        return SITE_INT3;
    }
    if (b[i] != 0x0f || i + 1 >= n) {
        return 0;
    }
    if (b[i + 1] == 0x30) {
        return SITE_WRMSR;
    }
    if (b[i + 1] == 0x01 && i + 2 < n && (b[i + 2] == 0xc1 || b[i + 2] == 0xd9)) {
        return SITE_HYPERCALL; /* vmcall, vmmcall */
    }
    if (b[i + 1] == 0x22 && i + 2 < n) {
        uint8_t modrm = b[i + 2];
        *cr = (uint8_t)((((rex >> 2) & 1) << 3) | ((modrm >> 3) & 7) | (lock ? 8 : 0));
        *src = (uint8_t)(((rex & 1) << 3) | (modrm & 7));
        return (*cr == 0 || *cr == 3 || *cr == 4) ? SITE_CR_WRITE : 0;
    }
    return 0;
}

/* swapgs, iret, sysret, sysexit or hlt: where blocks check the attention flag. */
static bool is_attention_insn(const uint8_t *b, size_t n)
{
    bool lock;
    uint8_t rex;
    size_t i = opcode_index(b, n, &lock, &rex);

    if (i >= n) {
        return false;
    }
    if (b[i] == 0xcf || b[i] == 0xf4) {
        return true; /* iret, hlt */
    }
    if (b[i] != 0x0f || i + 1 >= n) {
        return false;
    }
    return b[i + 1] == 0x07 || b[i + 1] == 0x35 || /* sysret, sysexit */
           (b[i + 1] == 0x01 && i + 2 < n && b[i + 2] == 0xf8); /* swapgs */
}

static uint64_t breakpoint_gpa(struct vcpu *v, uint64_t gva)
{
    return translate_gva(read_reg(v, R_CR0), read_reg(v, R_CR3), read_reg(v, R_CR4),
                         read_reg(v, R_EFER), gva);
}

static void on_cr_write(struct vcpu *v, const struct site *s)
{
    if (!event_enabled(v, KVMI_EVENT_CR) ||
        !(__atomic_load_n(&v->crs, __ATOMIC_RELAXED) & (1u << s->cr))) {
        return;
    }
    struct kvmi_event_cr ev = { .cr = s->cr };
    ev.old_value = read_reg(v, s->cr == 0 ? R_CR0 : s->cr == 3 ? R_CR3 : R_CR4);
    ev.new_value = read_reg(v, gpr_by_number[s->src]);
    if (s->cr == 3 && (read_reg(v, R_CR4) & CR4_PCIDE)) {
        ev.new_value &= ~CR3_NOFLUSH; /* a hint, never stored in CR3 */
    }
    if (ev.old_value == ev.new_value) {
        return;
    }
    send_event(v, KVMI_EVENT_CR, s->gva, true, &ev, sizeof(ev), cfg.reply_timeout_ms);
}

static bool msr_enabled(struct vcpu *v, uint32_t msr)
{
    const uint8_t *bits;
    if (msr < 0x2000) {
        bits = v->msrs_low;
    } else if (msr >= 0xc0000000u && msr < 0xc0002000u) {
        bits = v->msrs_high;
        msr -= 0xc0000000u;
    } else {
        return false;
    }
    return __atomic_load_n(&bits[msr / 8], __ATOMIC_RELAXED) & (1u << (msr % 8));
}

static void on_wrmsr(struct vcpu *v, const struct site *s)
{
    uint32_t msr = (uint32_t)read_reg(v, R_RCX);
    uint64_t value = (read_reg(v, R_RDX) << 32) | (read_reg(v, R_RAX) & 0xffffffffull);
    uint64_t old = 0;
    bool known = live_msr(v, msr, &old);

    remember_msr(v, msr, value);
    if (!event_enabled(v, KVMI_EVENT_MSR) || !msr_enabled(v, msr) || (known && old == value)) {
        return;
    }
    struct kvmi_event_msr ev = { .msr = msr, .old_value = old, .new_value = value };
    send_event(v, KVMI_EVENT_MSR, s->gva, true, &ev, sizeof(ev), cfg.reply_timeout_ms);
}

/*
 * Copy up to len bytes of guest virtual memory through v's current page tables, stopping
 * at the first page that does not translate (*faulted) or, for a string, after its first
 * NUL. Returns the bytes copied.
 */
static size_t copy_virtual(struct vcpu *v, uint64_t gva, uint8_t *dst, size_t len, bool string,
                           bool *faulted)
{
    uint64_t cr0 = read_reg(v, R_CR0), cr3 = read_reg(v, R_CR3), cr4 = read_reg(v, R_CR4);
    uint64_t efer = read_reg(v, R_EFER);
    size_t done = 0;

    *faulted = false;
    while (done < len) {
        size_t chunk = MIN(len - done, 4096 - (size_t)(gva & 4095));
        uint64_t gpa = translate_gva(cr0, cr3, cr4, efer, gva);
        if (gpa == UNMAPPED_GVA || !ram_read(gpa, dst + done, chunk)) {
            *faulted = true;
            break;
        }
        const uint8_t *nul = string ? memchr(dst + done, 0, chunk) : NULL;
        if (nul) {
            return (size_t)(nul - dst) + 1;
        }
        gva += chunk;
        done += chunk;
    }
    return done;
}

/* Copy guest virtual memory through v's current page tables; false if a page is unmapped. */
static bool read_virtual(struct vcpu *v, uint64_t gva, uint8_t *dst, size_t len)
{
    bool faulted;
    return copy_virtual(v, gva, dst, len, false, &faulted) == len;
}

/* A breakpoint event's payload: kvmi_event_breakpoint, then the rule's captures if any. */
struct bp_payload {
    struct kvmi_event_breakpoint bp;
    struct vmitrace_captured captured;
    uint8_t data[VMITRACE_CAPTURES * VMITRACE_MAX_CAPTURE];
};

/*
 * Whether a hit under this rule may go on without waiting for the reply (p: the
 * hit's captures). A captured value that could not be read waits.
 */
static bool hit_runs_on(struct vcpu *v, const struct bp_rule *rule, const struct bp_payload *p)
{
    if (!rule->run_on) {
        return false;
    }
    bool differ = false;
    if (rule->block_flags & VMITRACE_BLOCK_WORDS_DIFFER) {
        size_t end = (MAX(rule->differ_words[0], rule->differ_words[1]) + 1u) * 8;
        uint64_t a, b;
        if (p->captured.length[0] < end) {
            return false;
        }
        memcpy(&a, p->data + rule->differ_words[0] * 8u, sizeof(a));
        memcpy(&b, p->data + rule->differ_words[1] * 8u, sizeof(b));
        differ = a != b;
    }
    uint32_t value;
    if (rule->block_flags & VMITRACE_BLOCK_FROM_CAPTURE) {
        size_t at = (size_t)rule->block_reg * 8;
        if (p->captured.length[0] < at + sizeof(value)) {
            return false;
        }
        memcpy(&value, p->data + at, sizeof(value));
    } else {
        value = (uint32_t)read_reg(v, gpr_by_number[rule->block_reg]);
    }
    if (rule->block_flags & VMITRACE_BLOCK_BITMAP) {
        if (value >= VMITRACE_BLOCK_BITMAP_VALUES ||
            (rule->block_values[value / 32] & (1u << (value % 32)))) {
            return false;
        }
        const uint32_t *reversed = rule->block_values + VMITRACE_BLOCK_BITMAP_VALUES / 32;
        if ((rule->block_flags & VMITRACE_BLOCK_DIFFER_REVERSED) &&
            (reversed[value / 32] & (1u << (value % 32)))) {
            return differ;
        }
        return !differ;
    }
    if (differ) {
        return false;
    }
    for (unsigned i = 0; i < rule->count; i++) {
        if (rule->block_values[i] == value) {
            return false;
        }
    }
    return true;
}

static uint64_t captured_word(const struct bp_payload *p, unsigned word)
{
    uint64_t value;
    memcpy(&value, p->data + (size_t)word * 8, sizeof(value));
    return value;
}

/*
 * The pointer captures of a hit (p: its captures) that the table chooses, into
 * v->pointers: vmitrace_table_captured, a vmitrace_pointer_capture each, their bytes.
 * Returns their length; 0 if the first capture was not read or no entry has the key.
 */
static size_t capture_pointers(struct vcpu *v, const struct capture_table *t,
                               const struct bp_payload *p, bool *cut)
{
    if (p->captured.length[0] < t->min_capture) {
        return 0; /* unread (0), which bounds every word below */
    }
    uint32_t key = (uint32_t)captured_word(p, t->key_word);
    if (key >= VMITRACE_TABLE_KEYS || t->count[key] == 0) {
        return 0;
    }
    struct vmitrace_table_captured head = { .count = t->count[key] };
    struct vmitrace_pointer_capture *pcs = (void *)(v->pointers + sizeof(head));
    size_t used = sizeof(head) + head.count * sizeof(*pcs);

    memcpy(v->pointers, &head, sizeof(head));
    for (unsigned i = 0; i < head.count; i++) {
        const struct vmitrace_table_entry *e = &t->entries[t->first[key] + i];
        /* WORDS32: a 32-bit caller's registers, whose high halves the kernel ignores */
        bool words32 = e->flags & VMITRACE_TABLE_WORDS32;
        uint64_t want = e->max_length;
        bool more = e->length_word == VMITRACE_TABLE_NO_LENGTH; /* beyond max_length */
        if (e->length_word != VMITRACE_TABLE_NO_LENGTH) {
            uint64_t bound = captured_word(p, e->length_word);
            if (words32) {
                bound = (e->flags & VMITRACE_TABLE_SIGNED_LENGTH)
                            ? (uint64_t)(int64_t)(int32_t)bound : (uint32_t)bound;
            }
            if ((e->flags & VMITRACE_TABLE_SIGNED_LENGTH) && (int64_t)bound < 0) {
                bound = 0;
            }
            more = bound > want;
            want = MIN(want, bound);
        }
        uint64_t pointer = captured_word(p, e->pointer_word);
        if (words32) {
            pointer = (uint32_t)pointer;
        }
        if (e->flags & VMITRACE_TABLE_INDIRECT) {
            uint64_t at = pointer + e->offset;
            pointer = 0; /* a u32 fills the low half (little-endian host) */
            if (!read_virtual(v, at, (uint8_t *)&pointer, words32 ? 4 : 8)) {
                pointer = 0; /* unreadable, maybe in part: no address, as for NULL */
            }
        }
        struct vmitrace_pointer_capture pc = { .gva = pointer };
        bool faulted = false;
        size_t got = 0;
        if (want && !pc.gva) {
            faulted = true; /* a NULL pointer, never read */
        } else if (want) {
            got = copy_virtual(v, pc.gva, v->pointers + used, want,
                               e->flags & VMITRACE_TABLE_STRING, &faulted);
        }
        /* Stopped by max_length before a fault, the length word's end or a string's NUL. */
        if ((e->flags & VMITRACE_TABLE_WAIT_IF_CUT) && more && !faulted &&
            got == e->max_length &&
            !((e->flags & VMITRACE_TABLE_STRING) && v->pointers[used + got - 1] == 0)) {
            *cut = true;
        }
        pc.length = (uint16_t)got;
        pc.faulted = faulted;
        memcpy(&pcs[i], &pc, sizeof(pc));
        used += got;
    }
    return used;
}

static void on_breakpoint_hit(struct vcpu *v, const struct site *s, const struct bp_rule *rule)
{
    struct bp_payload p = { .bp = { .gpa = breakpoint_gpa(v, s->gva), .insn_len = s->len } };
    size_t len = sizeof(p.bp);
    size_t pointers_len = 0;
    bool cut = false; /* a WAIT_IF_CUT capture did not hold all it was to */
    uint8_t flags = 0;

    if (rule && (rule->captures[0].base != VMITRACE_CAPTURE_NONE ||
                 rule->captures[1].base != VMITRACE_CAPTURE_NONE)) {
        size_t used = 0;
        for (unsigned i = 0; i < VMITRACE_CAPTURES; i++) {
            const struct vmitrace_capture *c = &rule->captures[i];
            if (c->base == VMITRACE_CAPTURE_NONE) {
                continue;
            }
            uint64_t base = c->base == VMITRACE_CAPTURE_GS_BASE
                                ? read_reg(v, R_GS_BASE)
                                : read_reg(v, gpr_by_number[c->base]);
            if (read_virtual(v, base + (int64_t)c->offset, p.data + used, c->length)) {
                p.captured.length[i] = c->length;
                used += c->length;
            }
        }
        len = offsetof(struct bp_payload, data) + used;
        flags = VMITRACE_EVENT_CAPTURED;
        if (rule->table && (pointers_len = capture_pointers(v, rule->table, &p, &cut))) {
            flags |= VMITRACE_EVENT_TABLE_CAPTURED;
        }
    }
    deliver_event(v, KVMI_EVENT_BREAKPOINT, s->gva, true, &p, len, v->pointers, pointers_len,
                  cfg.reply_timeout_ms, rule && !cut && hit_runs_on(v, rule, &p), flags);
}

static bool breakpoint_set(uint64_t gva)
{
    g_mutex_lock(&bp_lock);
    bool set = g_hash_table_contains(breakpoints, &gva);
    g_mutex_unlock(&bp_lock);
    return set;
}

/*
 * The rule of the breakpoint at gva (copied out, with a reference to its table that the
 * caller releases); false if there is none.
 */
static bool breakpoint_rule(uint64_t gva, struct bp_rule *rule)
{
    g_mutex_lock(&bp_lock);
    const struct bp_rule *found = g_hash_table_lookup(breakpoints, &gva);
    if (found) {
        *rule = *found;
        if (rule->table) {
            g_atomic_rc_box_acquire(rule->table);
        }
    }
    g_mutex_unlock(&bp_lock);
    return found != NULL;
}

static void free_rule(gpointer key)
{
    struct bp_rule *rule = key;
    if (rule->table) {
        g_atomic_rc_box_release(rule->table);
    }
    g_free(rule);
}

/*
 * QEMU shares a translation between virtual addresses that map the same
 * physical code (PC-relative blocks), and the rip register is not kept up to
 * date inside a block. So blocks holding a site record, at their start, how far
 * the address they run at is from the one they were translated for.
 */
static void on_site_block(unsigned vcpu_index, void *userdata)
{
    struct vcpu *v = &vcpus[vcpu_index % MAX_VCPUS];
    v->rip_delta = read_reg(v, R_RIP) - (uint64_t)(uintptr_t)userdata;
}

static void on_site(unsigned vcpu_index, void *userdata)
{
    struct vcpu *v = &vcpus[vcpu_index % MAX_VCPUS];
    const struct site *translated = userdata;
    struct site actual = *translated;
    const struct site *s = &actual;

    actual.gva += v->rip_delta;

    switch (s->kind) {
    case SITE_CR_WRITE:
        on_cr_write(v, s);
        break;
    case SITE_WRMSR:
        on_wrmsr(v, s);
        break;
    case SITE_HYPERCALL:
        if (event_enabled(v, KVMI_EVENT_HYPERCALL)) {
            send_event(v, KVMI_EVENT_HYPERCALL, s->gva, true, NULL, 0, cfg.reply_timeout_ms);
        }
        break;
    case SITE_INT3:
        if (event_enabled(v, KVMI_EVENT_BREAKPOINT)) {
            on_breakpoint_hit(v, s, NULL);
        }
        break;
    case SITE_BREAKPOINT: {
        struct bp_rule rule;
        if (event_enabled(v, KVMI_EVENT_BREAKPOINT) && breakpoint_rule(s->gva, &rule)) {
            on_breakpoint_hit(v, s, &rule);
            if (rule.table) {
                g_atomic_rc_box_release(rule.table);
            }
        }
        break;
    }
    }
}

static void on_reset_done(qemu_plugin_id_t id);

/* Start-of-vCPU work: the CREATE_VCPU event, and the hold at boot. */
static void start_vcpu(struct vcpu *v)
{
    __atomic_store_n(&v->started, true, __ATOMIC_RELEASE);
    if (cfg.hold) {
        gint64 deadline = deadline_after(cfg.hold_timeout_ms);
        g_mutex_lock(&conn.write_lock);
        while (conn.fd < 0 && !conn.exiting) {
            if (!g_cond_wait_until(&conn.changed, &conn.write_lock, deadline)) {
                break;
            }
        }
        g_mutex_unlock(&conn.write_lock);
        if (!connected()) {
            logmsg("hold: no introspector within %u ms; vCPU %u starts", cfg.hold_timeout_ms,
                   v->index);
            return;
        }
        send_event(v, KVMI_EVENT_CREATE_VCPU, read_reg(v, R_RIP), true, NULL, 0,
                   cfg.hold_timeout_ms);
    } else if (__atomic_load_n(&conn.vm_events, __ATOMIC_RELAXED) &
               (1u << KVMI_EVENT_CREATE_VCPU)) {
        send_event(v, KVMI_EVENT_CREATE_VCPU, read_reg(v, R_RIP), true, NULL, 0,
                   cfg.reply_timeout_ms);
    }
}

/* Every present vCPU has run its first block: blocks need not all check attention. */
static void end_attention_everywhere_once_all_started(void)
{
    for (unsigned i = 0; i < MAX_VCPUS; i++) {
        if (__atomic_load_n(&vcpus[i].present, __ATOMIC_ACQUIRE) &&
            !__atomic_load_n(&vcpus[i].started, __ATOMIC_ACQUIRE)) {
            return;
        }
    }
    if (__atomic_exchange_n(&attention_everywhere, false, __ATOMIC_ACQ_REL)) {
        debug("every vCPU has started: only attention blocks check from now on");
        request_flush(); /* retranslate the blocks without their checks */
    }
}

/* Runs at the start of a block that checks attention, when this vCPU's flag is set. */
static void on_attention(unsigned vcpu_index, void *userdata)
{
    struct vcpu *v = &vcpus[vcpu_index % MAX_VCPUS];
    clear_attention(vcpu_index);
    if (!v->started) {
        start_vcpu(v);
        end_attention_everywhere_once_all_started();
    }
    serve_queued_commands(v);
    while (__atomic_load_n(&v->pending_pauses, __ATOMIC_ACQUIRE) > 0) {
        __atomic_sub_fetch(&v->pending_pauses, 1, __ATOMIC_ACQ_REL);
        send_event(v, KVMI_EVENT_PAUSE_VCPU, read_reg(v, R_RIP), true, NULL, 0,
                   cfg.reply_timeout_ms);
        serve_queued_commands(v);
    }
    flush_if_wanted();
}

static qemu_plugin_u64 attention_entry(void)
{
    return (qemu_plugin_u64){ .score = attention_board, .offset = 0 };
}

static void on_tb_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    size_t n = qemu_plugin_tb_n_insns(tb);
    uint64_t tb_vaddr = qemu_plugin_tb_vaddr(tb);
    bool has_site = false;
    bool checks_attention = __atomic_load_n(&attention_everywhere, __ATOMIC_ACQUIRE);
    bool any_breakpoints = __atomic_load_n(&bp_count, __ATOMIC_RELAXED) > 0;

    for (size_t i = 0; i < n; i++) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
        uint8_t bytes[16];
        size_t len = qemu_plugin_insn_data(insn, bytes, sizeof(bytes));
        struct site key = { .gva = qemu_plugin_insn_vaddr(insn),
                            .len = (uint8_t)qemu_plugin_insn_size(insn) };

        if (any_breakpoints && breakpoint_set(key.gva)) {
            struct site bp = key;
            bp.kind = SITE_BREAKPOINT;
            qemu_plugin_register_vcpu_insn_exec_cb(insn, on_site, QEMU_PLUGIN_CB_R_REGS,
                                                   intern_site(bp));
            has_site = true;
        }
        key.kind = (uint8_t)classify(bytes, len, &key.cr, &key.src);
        if (key.kind) {
            qemu_plugin_register_vcpu_insn_exec_cb(insn, on_site, QEMU_PLUGIN_CB_R_REGS,
                                                   intern_site(key));
            has_site = true;
        }
        checks_attention = checks_attention || is_attention_insn(bytes, len);
    }
    if (checks_attention || has_site) {
        qemu_plugin_register_vcpu_tb_exec_cond_cb(tb, on_attention, QEMU_PLUGIN_CB_R_REGS,
                                                  QEMU_PLUGIN_COND_NE, attention_entry(), 0,
                                                  NULL);
    }
    if (has_site) {
        qemu_plugin_register_vcpu_tb_exec_cb(tb, on_site_block, QEMU_PLUGIN_CB_R_REGS,
                                             (void *)(uintptr_t)tb_vaddr);
    }
}

static void on_vcpu_init(qemu_plugin_id_t id, unsigned int vcpu_index)
{
    if (vcpu_index >= MAX_VCPUS) {
        logmsg("vCPU %u is beyond the %d this plugin serves; it is not introspected",
               vcpu_index, MAX_VCPUS);
        return;
    }
    g_once(&reg_handles_once, lookup_register_handles, NULL);
    struct vcpu *v = &vcpus[vcpu_index];
    v->regbuf = g_byte_array_sized_new(64);
    v->rx = g_malloc(MAX_INCOMING);
    v->pointers = g_malloc(VMITRACE_POINTER_CAPTURES_SIZE);
    __atomic_store_n(&v->present, true, __ATOMIC_RELEASE);
    set_attention(vcpu_index); /* first block: CREATE_VCPU / hold */
    if (!__atomic_exchange_n(&attention_everywhere, true, __ATOMIC_ACQ_REL)) {
        request_flush(); /* a vCPU added later: its first blocks must check too */
    }
}

/* A halted vCPU cannot serve commands: snapshot its (unchanging) state instead. */
static void on_vcpu_idle(qemu_plugin_id_t id, unsigned int vcpu_index)
{
    struct cpu_state st;
    struct vcpu *v = &vcpus[vcpu_index % MAX_VCPUS];

    if (!__atomic_load_n(&v->present, __ATOMIC_ACQUIRE)) {
        return;
    }
    capture_state(v, read_reg(v, R_RIP), &st);
    g_mutex_lock(&v->lock);
    v->idle_state = st;
    v->idle = true;
    g_mutex_unlock(&v->lock);
    serve_queued_commands(v); /* those that arrived just before it halted */
}

static void on_vcpu_resume(qemu_plugin_id_t id, unsigned int vcpu_index)
{
    struct vcpu *v = &vcpus[vcpu_index % MAX_VCPUS];
    g_mutex_lock(&v->lock);
    v->idle = false;
    g_mutex_unlock(&v->lock);
}

static void on_qemu_exit(qemu_plugin_id_t id, void *userdata);

static void register_callbacks(void)
{
    qemu_plugin_register_vcpu_idle_cb(plugin_id, on_vcpu_idle);
    qemu_plugin_register_vcpu_resume_cb(plugin_id, on_vcpu_resume);
    qemu_plugin_register_vcpu_init_cb(plugin_id, on_vcpu_init);
    qemu_plugin_register_vcpu_tb_trans_cb(plugin_id, on_tb_translate);
    qemu_plugin_register_atexit_cb(plugin_id, on_qemu_exit, NULL);
}

/* Called in QEMU's exclusive context after the translation cache was flushed. */
static void on_reset_done(qemu_plugin_id_t id)
{
    /* No translation refers to a site any more, and no vCPU is in a callback. */
    g_mutex_lock(&sites_lock);
    g_hash_table_remove_all(sites);
    g_mutex_unlock(&sites_lock);
    register_callbacks();
    g_mutex_lock(&flush_lock);
    reset_inflight = false;
    bool again = flush_wanted;
    g_mutex_unlock(&flush_lock);
    if (again) {
        set_attention_all();
    }
    debug("translations flushed");
}

/*
 * Ask for a translation flush. QEMU only flushes from a vCPU thread, so the
 * next vCPU to start a translation block issues it; the flush then happens
 * before any vCPU runs more than that one block. Callers never wait for it: a
 * vCPU stopped in an event could not flush until its reply arrives.
 */
static void request_flush(void)
{
    g_mutex_lock(&flush_lock);
    flush_wanted = true;
    g_mutex_unlock(&flush_lock);
    set_attention_all();
}

/* On a vCPU thread: issue the flush if one is wanted and none is under way. */
static void flush_if_wanted(void)
{
    g_mutex_lock(&flush_lock);
    bool flush = flush_wanted && !reset_inflight;
    if (flush) {
        flush_wanted = false;
        reset_inflight = true;
    }
    g_mutex_unlock(&flush_lock);
    if (flush) {
        qemu_plugin_reset(plugin_id, on_reset_done);
    }
}

/* ---------------------------------------------------- commands (reader) */

static bool command_supported(unsigned id)
{
    switch (id) {
    case KVMI_GET_VERSION:
    case KVMI_CHECK_COMMAND:
    case KVMI_CHECK_EVENT:
    case KVMI_GET_GUEST_INFO:
    case KVMI_GET_VCPU_INFO:
    case KVMI_PAUSE_VCPU:
    case KVMI_CONTROL_VM_EVENTS:
    case KVMI_CONTROL_EVENTS:
    case KVMI_CONTROL_CR:
    case KVMI_CONTROL_MSR:
    case KVMI_GET_REGISTERS:
    case VMITRACE_SET_BREAKPOINT:
    case VMITRACE_CLEAR_BREAKPOINT:
    case VMITRACE_SET_DELIVERY:
    case VMITRACE_SET_BREAKPOINT_EX:
    case VMITRACE_SET_CAPTURE_TABLE:
    case VMITRACE_GET_VCPU_STATS:
        return true;
    case KVMI_READ_PHYSICAL:
    case KVMI_WRITE_PHYSICAL:
    case KVMI_VCPU_TRANSLATE_GVA:
        return ram != NULL;
    }
    return false;
}

static bool event_supported(unsigned id)
{
    switch (id) {
    case KVMI_EVENT_UNHOOK:
    case KVMI_EVENT_CR:
    case KVMI_EVENT_MSR:
    case KVMI_EVENT_BREAKPOINT:
    case KVMI_EVENT_HYPERCALL:
    case KVMI_EVENT_CREATE_VCPU:
    case KVMI_EVENT_PAUSE_VCPU:
        return true;
    }
    return false;
}

static bool is_vm_event(unsigned id)
{
    return id == KVMI_EVENT_UNHOOK || id == KVMI_EVENT_CREATE_VCPU;
}

static bool all_zero(const void *p, size_t len)
{
    const uint8_t *b = p;
    for (size_t i = 0; i < len; i++) {
        if (b[i]) {
            return false;
        }
    }
    return true;
}

/* Validate the kvmi_vcpu_hdr at the start of a vCPU command; 0 or -error. */
static int vcpu_from_payload(const uint8_t *payload, size_t size, size_t body, struct vcpu **out)
{
    struct kvmi_vcpu_hdr vh;
    if (size < sizeof(vh) + body) {
        return -KVM_EINVAL;
    }
    memcpy(&vh, payload, sizeof(vh));
    if (vh.padding1 || vh.padding2 || vh.vcpu >= MAX_VCPUS ||
        !__atomic_load_n(&vcpus[vh.vcpu].present, __ATOMIC_ACQUIRE)) {
        return -KVM_EINVAL;
    }
    *out = &vcpus[vh.vcpu];
    return 0;
}

/* Serve a vCPU-context command: now if the vCPU is halted, else on its thread. */
static int queue_to_vcpu(unsigned generation, struct vcpu *v, const struct kvmi_msg_hdr *hdr,
                         const uint8_t *payload)
{
    struct queued_command *qc = g_malloc(sizeof(*qc) + hdr->size);
    qc->generation = generation;
    qc->hdr = *hdr;
    memcpy(qc->payload, payload, hdr->size);

    /* One critical section with on_vcpu_idle: a command is either served from the
     * snapshot here or queued before the vCPU drains its queue when halting. */
    g_mutex_lock(&v->lock);
    if (v->idle) {
        struct cpu_state st = v->idle_state; /* unchanged until the vCPU resumes */
        g_mutex_unlock(&v->lock);
        serve_from_state(v, &st, generation, hdr, payload);
        g_free(qc);
        return 0;
    }
    if (g_queue_get_length(&v->commands) >= MAX_QUEUED_COMMANDS) {
        g_mutex_unlock(&v->lock);
        g_free(qc);
        return -KVM_EBUSY;
    }
    g_queue_push_tail(&v->commands, qc);
    g_cond_signal(&v->cond);
    g_mutex_unlock(&v->lock);
    set_attention(v->index);
    return 0;
}

static void handle_event_reply(const struct kvmi_msg_hdr *hdr, const uint8_t *payload)
{
    struct kvmi_vcpu_hdr vh;
    struct kvmi_event_reply er;

    if (hdr->size < sizeof(vh) + sizeof(er)) {
        logmsg("short event reply (seq %u, %u bytes) ignored", hdr->seq, hdr->size);
        return;
    }
    memcpy(&vh, payload, sizeof(vh));
    memcpy(&er, payload + sizeof(vh), sizeof(er));
    if (vh.vcpu >= MAX_VCPUS) {
        logmsg("event reply for unknown vCPU %u ignored", vh.vcpu);
        return;
    }
    struct vcpu *v = &vcpus[vh.vcpu];
    g_mutex_lock(&v->lock);
    if (v->waiting && !v->replied && v->wait_seq == hdr->seq) {
        v->replied = true;
        v->reply_action = er.action;
        g_cond_signal(&v->cond);
    } else {
        debug("reply to seq %u on vCPU %u not awaited (non-blocking or late): discarded",
              hdr->seq, vh.vcpu);
    }
    g_mutex_unlock(&v->lock);
}

static int set_msr_bit(struct vcpu *v, uint32_t msr, bool enable)
{
    uint8_t *bits;
    if (msr < 0x2000) {
        bits = v->msrs_low;
    } else if (msr >= 0xc0000000u && msr < 0xc0002000u) {
        bits = v->msrs_high;
        msr -= 0xc0000000u;
    } else {
        return -KVM_EINVAL;
    }
    if (enable) {
        __atomic_or_fetch(&bits[msr / 8], (uint8_t)(1u << (msr % 8)), __ATOMIC_RELAXED);
    } else {
        __atomic_and_fetch(&bits[msr / 8], (uint8_t)~(1u << (msr % 8)), __ATOMIC_RELAXED);
    }
    return 0;
}

/* The rule a SET_BREAKPOINT(_EX) or CLEAR payload carries; false if malformed. */
static bool parse_breakpoint(const struct kvmi_msg_hdr *hdr, const uint8_t *payload,
                             struct bp_rule *rule)
{
    memset(rule, 0, sizeof(*rule));
    rule->captures[0].base = rule->captures[1].base = VMITRACE_CAPTURE_NONE;
    if (hdr->id != VMITRACE_SET_BREAKPOINT_EX) {
        struct vmitrace_breakpoint bp;
        if (hdr->size != sizeof(bp)) {
            return false;
        }
        memcpy(&bp, payload, sizeof(bp));
        rule->gva = bp.gva;
        return true;
    }
    struct vmitrace_breakpoint_ex req;
    size_t fixed = offsetof(struct vmitrace_breakpoint_ex, block_values);
    if (hdr->size < fixed) {
        return false;
    }
    memcpy(&req, payload, fixed);
    bool from_capture = req.block_flags & VMITRACE_BLOCK_FROM_CAPTURE;
    const uint8_t reversed = VMITRACE_BLOCK_BITMAP | VMITRACE_BLOCK_WORDS_DIFFER |
                             VMITRACE_BLOCK_DIFFER_REVERSED;
    unsigned bitmap_words = (req.block_flags & VMITRACE_BLOCK_DIFFER_REVERSED ? 2 : 1) *
                            VMITRACE_BLOCK_BITMAP_VALUES / 32;
    if (req.run_on > 1 || req.count > VMITRACE_MAX_BLOCK_WORDS ||
        req.block_reg > (from_capture ? VMITRACE_MAX_CAPTURE / 8 - 1 : 15) ||
        (req.block_flags & ~(VMITRACE_BLOCK_FROM_CAPTURE | reversed)) ||
        ((req.block_flags & VMITRACE_BLOCK_DIFFER_REVERSED) &&
         (req.block_flags & reversed) != reversed) ||
        ((req.block_flags & VMITRACE_BLOCK_BITMAP) ? req.count != bitmap_words
                                                   : req.count > VMITRACE_MAX_BLOCK_VALUES) ||
        !all_zero(req.padding, sizeof(req.padding)) ||
        hdr->size != fixed + req.count * sizeof(uint32_t)) {
        return false;
    }
    for (unsigned i = 0; i < VMITRACE_CAPTURES; i++) {
        const struct vmitrace_capture *c = &req.captures[i];
        if (c->padding || (c->base != VMITRACE_CAPTURE_NONE &&
                           (c->base > VMITRACE_CAPTURE_GS_BASE || c->length == 0 ||
                            c->length > VMITRACE_MAX_CAPTURE))) {
            return false;
        }
        rule->captures[i] = *c;
    }
    /* Values from the first capture must lie inside it; unused differ_words are 0. */
    bool differ = req.block_flags & VMITRACE_BLOCK_WORDS_DIFFER;
    size_t first = req.captures[0].base == VMITRACE_CAPTURE_NONE ? 0 : req.captures[0].length;
    if ((from_capture && first < (req.block_reg + 1u) * 8) ||
        (differ && first < (MAX(req.differ_words[0], req.differ_words[1]) + 1u) * 8) ||
        (!differ && (req.differ_words[0] || req.differ_words[1]))) {
        return false;
    }
    memcpy(rule->differ_words, req.differ_words, sizeof(rule->differ_words));
    rule->gva = req.gva;
    rule->run_on = req.run_on == 1;
    rule->block_reg = req.block_reg;
    rule->block_flags = req.block_flags;
    rule->count = req.count;
    memcpy(rule->block_values, payload + fixed, req.count * sizeof(uint32_t));
    return true;
}

/* 1 if the set of breakpoint addresses changed (translations must go), 0 if not. */
static int update_breakpoint(const struct kvmi_msg_hdr *hdr, const uint8_t *payload)
{
    struct bp_rule rule;
    if (!parse_breakpoint(hdr, payload, &rule)) {
        return -KVM_EINVAL;
    }
    bool changed;
    g_mutex_lock(&bp_lock);
    if (hdr->id == VMITRACE_CLEAR_BREAKPOINT) {
        changed = g_hash_table_remove(breakpoints, &rule.gva);
    } else {
        struct bp_rule *old = g_hash_table_lookup(breakpoints, &rule.gva);
        changed = old == NULL;
        /* A new rule keeps the table while its first capture still holds the words. */
        if (old && old->table && hdr->id == VMITRACE_SET_BREAKPOINT_EX &&
            rule.captures[0].base != VMITRACE_CAPTURE_NONE &&
            rule.captures[0].length >= old->table->min_capture) {
            rule.table = old->table;
            old->table = NULL;
        }
        struct bp_rule *stored = g_memdup2(&rule, sizeof(rule));
        g_hash_table_replace(breakpoints, &stored->gva, stored); /* frees an older rule */
    }
    __atomic_store_n(&bp_count, g_hash_table_size(breakpoints), __ATOMIC_RELAXED);
    g_mutex_unlock(&bp_lock);
    return changed ? 1 : 0;
}

/*
 * Parse a VMITRACE_SET_CAPTURE_TABLE payload; false if malformed. *table: its entries
 * grouped by key, in table order (NULL for an empty table); *min_capture: the bytes of
 * the first capture that its words need.
 */
static bool parse_capture_table(const struct kvmi_msg_hdr *hdr, const uint8_t *payload,
                                uint64_t *gva, size_t *min_capture, struct capture_table **table)
{
    struct vmitrace_capture_table req;
    struct vmitrace_table_entry e;
    uint8_t count[VMITRACE_TABLE_KEYS] = { 0 };
    const uint8_t *raw = payload + sizeof(req);
    const unsigned words = VMITRACE_MAX_CAPTURE / 8;

    if (hdr->size < sizeof(req)) {
        return false;
    }
    memcpy(&req, payload, sizeof(req));
    if (!all_zero(req.padding, sizeof(req.padding)) || req.count > VMITRACE_MAX_TABLE_ENTRIES ||
        hdr->size != sizeof(req) + req.count * sizeof(e) || req.key_word >= words) {
        return false;
    }
    unsigned max_word = req.key_word;
    for (unsigned i = 0; i < req.count; i++) {
        memcpy(&e, raw + i * sizeof(e), sizeof(e));
        bool bounded = e.length_word != VMITRACE_TABLE_NO_LENGTH;
        if (e.key >= VMITRACE_TABLE_KEYS || e.pointer_word >= words ||
            (bounded && e.length_word >= words) || e.max_length == 0 ||
            e.max_length > VMITRACE_MAX_POINTER_CAPTURE ||
            (e.flags & ~(VMITRACE_TABLE_STRING | VMITRACE_TABLE_SIGNED_LENGTH |
                         VMITRACE_TABLE_WORDS32 | VMITRACE_TABLE_INDIRECT |
                         VMITRACE_TABLE_WAIT_IF_CUT)) ||
            (e.offset && !(e.flags & VMITRACE_TABLE_INDIRECT)) ||
            count[e.key] == VMITRACE_MAX_TABLE_CAPTURES) {
            return false;
        }
        count[e.key]++;
        max_word = MAX(max_word, MAX(e.pointer_word, bounded ? e.length_word : 0u));
    }
    *gva = req.gva;
    *min_capture = (max_word + 1) * 8;
    *table = NULL;
    if (req.count == 0) {
        return true;
    }
    struct capture_table *t = g_atomic_rc_box_alloc0(sizeof(*t) + req.count * sizeof(e));
    t->min_capture = *min_capture;
    t->key_word = req.key_word;
    memcpy(t->count, count, sizeof(count));
    for (unsigned key = 0, next = 0; key < VMITRACE_TABLE_KEYS; key++) {
        t->first[key] = (uint16_t)next;
        next += count[key];
    }
    memset(count, 0, sizeof(count)); /* now: entries placed per key */
    for (unsigned i = 0; i < req.count; i++) {
        memcpy(&e, raw + i * sizeof(e), sizeof(e));
        t->entries[t->first[e.key] + count[e.key]++] = e;
    }
    *table = t;
    return true;
}

/* VMITRACE_SET_CAPTURE_TABLE: 0 or -error. */
static int set_capture_table(const struct kvmi_msg_hdr *hdr, const uint8_t *payload)
{
    uint64_t gva;
    size_t min_capture;
    struct capture_table *table;
    int err = 0;

    if (!parse_capture_table(hdr, payload, &gva, &min_capture, &table)) {
        return -KVM_EINVAL;
    }
    g_mutex_lock(&bp_lock);
    struct bp_rule *rule = g_hash_table_lookup(breakpoints, &gva);
    if (!rule || rule->captures[0].base == VMITRACE_CAPTURE_NONE) {
        err = -KVM_ENOENT;
    } else if (rule->captures[0].length < min_capture) {
        err = -KVM_EINVAL;
    } else {
        struct capture_table *old = rule->table;
        rule->table = table;
        table = old;
    }
    g_mutex_unlock(&bp_lock);
    if (table) {
        g_atomic_rc_box_release(table); /* the replaced one, or the refused new one */
    }
    return err;
}

/* Serve one command on the reader thread; vCPU-context ones are queued. */
static void handle_command(unsigned generation, const struct kvmi_msg_hdr *hdr,
                           const uint8_t *payload)
{
    size_t size = hdr->size;
    struct vcpu *v = NULL;
    int err = 0;

    switch (hdr->id) {
    case KVMI_GET_VERSION: {
        struct kvmi_get_version_reply rpl = { .version = KVMI_VERSION };
        send_reply(generation, hdr, 0, &rpl, sizeof(rpl));
        return;
    }
    case KVMI_CHECK_COMMAND:
    case KVMI_CHECK_EVENT: {
        struct kvmi_check_id req;
        if (size < sizeof(req)) {
            err = -KVM_EINVAL;
            break;
        }
        memcpy(&req, payload, sizeof(req));
        if (req.padding1 || req.padding2) {
            err = -KVM_EINVAL;
        } else if (hdr->id == KVMI_CHECK_COMMAND) {
            err = command_supported(req.id) ? 0 : -KVM_ENOENT;
        } else {
            err = event_supported(req.id) ? 0 : -KVM_ENOENT;
        }
        break;
    }
    case KVMI_GET_GUEST_INFO: {
        struct kvmi_get_guest_info_reply rpl = { .vcpu_count = vcpu_count };
        send_reply(generation, hdr, 0, &rpl, sizeof(rpl));
        return;
    }
    case KVMI_GET_VCPU_INFO: {
        struct kvmi_get_vcpu_info_reply rpl = { .tsc_speed = 0 }; /* unknown under TCG */
        err = vcpu_from_payload(payload, size, 0, &v);
        if (!err) {
            send_reply(generation, hdr, 0, &rpl, sizeof(rpl));
            return;
        }
        break;
    }
    case KVMI_PAUSE_VCPU: {
        struct kvmi_pause_vcpu req;
        err = vcpu_from_payload(payload, size, sizeof(req), &v);
        if (err) {
            break;
        }
        memcpy(&req, payload + sizeof(struct kvmi_vcpu_hdr), sizeof(req));
        if (req.padding1 || req.padding2 || req.padding3 || req.wait > 1) {
            err = -KVM_EINVAL;
        } else if (__atomic_add_fetch(&v->pending_pauses, 1, __ATOMIC_ACQ_REL) >
                   MAX_PENDING_PAUSES) {
            __atomic_sub_fetch(&v->pending_pauses, 1, __ATOMIC_ACQ_REL);
            err = -KVM_EBUSY;
        } else {
            set_attention(v->index);
        }
        break;
    }
    case KVMI_CONTROL_VM_EVENTS: {
        struct kvmi_control_events req;
        if (size < sizeof(req)) {
            err = -KVM_EINVAL;
            break;
        }
        memcpy(&req, payload, sizeof(req));
        if (req.padding1 || req.padding2 || req.enable > 1 || req.event_id >= KVMI_NUM_EVENTS ||
            !is_vm_event(req.event_id)) {
            err = -KVM_EINVAL;
        } else if (req.enable) {
            __atomic_or_fetch(&conn.vm_events, 1u << req.event_id, __ATOMIC_RELAXED);
        } else {
            __atomic_and_fetch(&conn.vm_events, ~(1u << req.event_id), __ATOMIC_RELAXED);
        }
        break;
    }
    case KVMI_CONTROL_EVENTS: {
        struct kvmi_control_events req;
        err = vcpu_from_payload(payload, size, sizeof(req), &v);
        if (err) {
            break;
        }
        memcpy(&req, payload + sizeof(struct kvmi_vcpu_hdr), sizeof(req));
        if (req.padding1 || req.padding2 || req.enable > 1 || req.event_id >= KVMI_NUM_EVENTS ||
            is_vm_event(req.event_id)) {
            err = -KVM_EINVAL;
        } else if (!event_supported(req.event_id)) {
            err = -KVM_EOPNOTSUPP;
        } else if (req.event_id == KVMI_EVENT_PAUSE_VCPU) {
            err = 0; /* always on: a result of PAUSE_VCPU */
        } else if (req.enable) {
            __atomic_or_fetch(&v->events, 1u << req.event_id, __ATOMIC_RELAXED);
        } else {
            __atomic_and_fetch(&v->events, ~(1u << req.event_id), __ATOMIC_RELAXED);
        }
        break;
    }
    case KVMI_CONTROL_CR: {
        struct kvmi_control_cr req;
        err = vcpu_from_payload(payload, size, sizeof(req), &v);
        if (err) {
            break;
        }
        memcpy(&req, payload + sizeof(struct kvmi_vcpu_hdr), sizeof(req));
        if (req.padding1 || req.padding2 || req.enable > 1 ||
            !(req.cr == 0 || req.cr == 3 || req.cr == 4)) {
            err = -KVM_EINVAL;
        } else if (req.enable) {
            __atomic_or_fetch(&v->crs, 1u << req.cr, __ATOMIC_RELAXED);
        } else {
            __atomic_and_fetch(&v->crs, ~(1u << req.cr), __ATOMIC_RELAXED);
        }
        break;
    }
    case KVMI_CONTROL_MSR: {
        struct kvmi_control_msr req;
        err = vcpu_from_payload(payload, size, sizeof(req), &v);
        if (err) {
            break;
        }
        memcpy(&req, payload + sizeof(struct kvmi_vcpu_hdr), sizeof(req));
        if (req.padding1 || req.padding2 || req.enable > 1) {
            err = -KVM_EINVAL;
        } else {
            err = set_msr_bit(v, req.msr, req.enable);
        }
        break;
    }
    case KVMI_GET_REGISTERS: {
        struct kvmi_get_registers req;
        err = vcpu_from_payload(payload, size, sizeof(req), &v);
        if (err) {
            break;
        }
        memcpy(&req, payload + sizeof(struct kvmi_vcpu_hdr), sizeof(req));
        size_t expected = sizeof(struct kvmi_vcpu_hdr) + sizeof(req) + (size_t)req.nmsrs * 4;
        size_t reply = 8 + sizeof(struct kvmi_get_registers_reply) +
                       (size_t)req.nmsrs * sizeof(struct kvm_msr_entry);
        if (req.padding1 || req.padding2 || size < expected) {
            err = -KVM_EINVAL;
        } else if (reply > KVMI_MSG_SIZE) {
            err = -KVM_E2BIG;
        } else if ((err = queue_to_vcpu(generation, v, hdr, payload)) == 0) {
            return; /* answered on the vCPU */
        }
        break;
    }
    case KVMI_VCPU_TRANSLATE_GVA: {
        if (!ram) {
            err = -KVM_EOPNOTSUPP;
            break;
        }
        err = vcpu_from_payload(payload, size, sizeof(struct kvmi_translate_gva), &v);
        if (!err && (err = queue_to_vcpu(generation, v, hdr, payload)) == 0) {
            return;
        }
        break;
    }
    case KVMI_READ_PHYSICAL: {
        struct kvmi_read_physical req;
        if (!ram) {
            err = -KVM_EOPNOTSUPP;
            break;
        }
        if (size < sizeof(req)) {
            err = -KVM_EINVAL;
            break;
        }
        memcpy(&req, payload, sizeof(req));
        if (req.size == 0 || req.size > KVMI_MSG_SIZE - sizeof(struct kvmi_error_code)) {
            err = -KVM_EINVAL;
        } else if (req.gpa >= ram_size || req.size > ram_size - req.gpa) {
            err = -KVM_ENOENT;
        } else {
            send_reply(generation, hdr, 0, ram + req.gpa, req.size);
            return;
        }
        break;
    }
    case KVMI_WRITE_PHYSICAL: {
        struct kvmi_write_physical req;
        if (!ram) {
            err = -KVM_EOPNOTSUPP;
            break;
        }
        if (size < sizeof(req)) {
            err = -KVM_EINVAL;
            break;
        }
        memcpy(&req, payload, sizeof(req));
        if (req.size == 0 || req.size != size - sizeof(req)) {
            err = -KVM_EINVAL;
        } else if (req.gpa >= ram_size || req.size > ram_size - req.gpa) {
            err = -KVM_ENOENT;
        } else {
            memcpy(ram + req.gpa, payload + sizeof(req), req.size);
            /* TCG does not see this write: drop translations of possibly changed code. */
            request_flush();
        }
        break;
    }
    case VMITRACE_SET_BREAKPOINT:
    case VMITRACE_SET_BREAKPOINT_EX:
    case VMITRACE_CLEAR_BREAKPOINT: {
        int changed = update_breakpoint(hdr, payload);
        if (changed < 0) {
            err = changed;
        } else if (changed) {
            request_flush();
        }
        break;
    }
    case VMITRACE_SET_CAPTURE_TABLE:
        err = set_capture_table(hdr, payload);
        break;
    case VMITRACE_GET_VCPU_STATS: {
        struct vmitrace_get_vcpu_stats req;
        if (size != sizeof(req)) {
            err = -KVM_EINVAL;
            break;
        }
        memcpy(&req, payload, sizeof(req));
        if (!all_zero(req.padding, sizeof(req.padding)) || req.vcpu >= MAX_VCPUS ||
            !__atomic_load_n(&vcpus[req.vcpu].present, __ATOMIC_ACQUIRE)) {
            err = -KVM_EINVAL;
            break;
        }
        const struct vmitrace_vcpu_stats *live = &vcpus[req.vcpu].stats;
        struct vmitrace_vcpu_stats out = {
            .events = __atomic_load_n(&live->events, __ATOMIC_RELAXED),
            .waits = __atomic_load_n(&live->waits, __ATOMIC_RELAXED),
            .timeouts = __atomic_load_n(&live->timeouts, __ATOMIC_RELAXED),
            .event_us = __atomic_load_n(&live->event_us, __ATOMIC_RELAXED),
            .wait_us = __atomic_load_n(&live->wait_us, __ATOMIC_RELAXED),
            .max_wait_us = __atomic_load_n(&live->max_wait_us, __ATOMIC_RELAXED),
        };
        send_reply(generation, hdr, 0, &out, sizeof(out));
        return;
    }
    case VMITRACE_SET_DELIVERY: {
        struct vmitrace_delivery req;
        if (size != sizeof(req)) {
            err = -KVM_EINVAL;
            break;
        }
        memcpy(&req, payload, sizeof(req));
        if (req.blocking > 1 || !all_zero(req.padding, sizeof(req.padding))) {
            err = -KVM_EINVAL;
        } else {
            __atomic_store_n(&conn.blocking, req.blocking == 1, __ATOMIC_RELEASE);
        }
        break;
    }
    default:
        err = -KVM_EOPNOTSUPP;
        break;
    }
    send_reply(generation, hdr, err, NULL, 0);
}

/* ----------------------------------------------------- connection thread */

static int connect_socket(void)
{
    struct sockaddr_un addr = { .sun_family = AF_UNIX };
    if (strlen(cfg.socket_path) >= sizeof(addr.sun_path)) {
        return -1;
    }
    strcpy(addr.sun_path, cfg.socket_path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        return -1;
    }
    if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static bool handshake(int fd)
{
    struct kvmi_qemu2introspector q2i = { .struct_size = sizeof(q2i), .start_time = start_time };
    uint32_t struct_size;
    uint8_t hash[20] = { 0 };

    memcpy(q2i.uuid, cfg.uuid, sizeof(q2i.uuid));
    memcpy(q2i.name, cfg.name, sizeof(q2i.name));
    if (!write_all(fd, &q2i, sizeof(q2i)) ||
        !read_all(fd, &struct_size, sizeof(struct_size), 0)) {
        logmsg("handshake failed: %s", strerror(errno));
        return false;
    }
    if (struct_size < sizeof(struct_size) || struct_size > MAX_HANDSHAKE_BYTES) {
        logmsg("handshake: introspector2qemu struct_size %u is invalid", struct_size);
        return false;
    }
    size_t rest = struct_size - sizeof(struct_size);
    uint8_t *tail = g_malloc(rest + 1);
    bool ok = read_all(fd, tail, rest, 0);
    memcpy(hash, tail, MIN(rest, sizeof(hash)));
    g_free(tail);
    if (!ok) {
        logmsg("handshake: short introspector2qemu");
        return false;
    }
    if (cfg.cookie) {
        guint8 want[20];
        gsize want_len = sizeof(want);
        GChecksum *sha1 = g_checksum_new(G_CHECKSUM_SHA1);
        g_checksum_update(sha1, (const guchar *)cfg.cookie, strlen(cfg.cookie));
        g_checksum_get_digest(sha1, want, &want_len);
        g_checksum_free(sha1);
        if (rest < sizeof(hash) || memcmp(want, hash, sizeof(want)) != 0) {
            logmsg("handshake: the introspector's cookie hash does not match; refusing it");
            return false;
        }
    }
    return true;
}

/* Forget everything the previous introspector asked for. */
static void reset_session_state(void)
{
    for (unsigned i = 0; i < MAX_VCPUS; i++) {
        struct vcpu *v = &vcpus[i];
        __atomic_store_n(&v->events, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&v->crs, 0, __ATOMIC_RELAXED);
        memset(v->msrs_low, 0, sizeof(v->msrs_low));
        memset(v->msrs_high, 0, sizeof(v->msrs_high));
        __atomic_store_n(&v->pending_pauses, 0, __ATOMIC_RELAXED);
        g_mutex_lock(&v->lock);
        g_queue_clear_full(&v->commands, g_free);
        g_cond_broadcast(&v->cond);
        g_mutex_unlock(&v->lock);
    }
    __atomic_store_n(&conn.vm_events, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&conn.blocking, true, __ATOMIC_RELEASE);
    g_mutex_lock(&bp_lock);
    bool had_breakpoints = g_hash_table_size(breakpoints) > 0;
    g_hash_table_remove_all(breakpoints);
    __atomic_store_n(&bp_count, 0, __ATOMIC_RELAXED);
    g_mutex_unlock(&bp_lock);
    if (had_breakpoints) {
        request_flush();
    }
}

static void set_connection(int fd)
{
    g_mutex_lock(&read_lock); /* not while a vCPU reads the old socket */
    g_mutex_lock(&conn.write_lock);
    int old = conn.fd;
    g_byte_array_set_size(conn.batch, 0); /* the old connection's */
    __atomic_store_n(&conn.fd, fd, __ATOMIC_RELEASE);
    __atomic_add_fetch(&conn.generation, 1, __ATOMIC_RELEASE);
    __atomic_store_n(&read_broken, false, __ATOMIC_RELEASE);
    g_cond_broadcast(&conn.changed);
    g_mutex_unlock(&conn.write_lock);
    if (old >= 0) {
        close(old);
    }
    g_mutex_unlock(&read_lock);
}

/* Whether fd has input (or an error to read) within wait_ms: READ_DONE if so. */
static enum read_result wait_for_input(int fd, int wait_ms)
{
    struct pollfd pfd = { .fd = fd, .events = POLLIN };
    int ready = poll(&pfd, 1, wait_ms);

    if (ready > 0) {
        return READ_DONE;
    }
    return ready == 0 || errno == EINTR ? READ_NOTHING : READ_BROKEN;
}

/*
 * With read_lock held, fd readable: read a message whole and dispatch it. A
 * message that starts must be complete within the reply timeout, or the peer
 * is considered broken.
 */
static enum read_result read_one_message(int fd, unsigned generation, uint8_t *payload)
{
    struct kvmi_msg_hdr hdr;
    gint64 deadline = deadline_after(cfg.reply_timeout_ms);

    if (!read_all(fd, &hdr, sizeof(hdr), deadline)) {
        return READ_BROKEN; /* also the introspector's orderly close */
    }
    size_t max = hdr.id == VMITRACE_SET_CAPTURE_TABLE ? VMITRACE_TABLE_MSG_SIZE : KVMI_MSG_SIZE;
    if (hdr.size > max) {
        logmsg("message id %u claims %u bytes (max %zu): dropping the connection", hdr.id,
               hdr.size, max);
        return READ_BROKEN;
    }
    if (!read_all(fd, payload, hdr.size, deadline)) {
        logmsg("short message (id %u): dropping the connection", hdr.id);
        return READ_BROKEN;
    }
    if (hdr.id == KVMI_EVENT_REPLY) {
        handle_event_reply(&hdr, payload);
    } else {
        handle_command(generation, &hdr, payload);
    }
    flush_batch(BATCH_FLUSH_MS * 1000); /* a busy introspector must not delay them */
    return READ_DONE;
}

/* Socket is readable within spin_us: poll without sleeping meanwhile. */
static bool spin_for_input(int fd)
{
    gint64 until = g_get_monotonic_time() + cfg.spin_us;
    struct pollfd pfd = { .fd = fd, .events = POLLIN };
    do {
        if (poll(&pfd, 1, 0) != 0) {
            return true;
        }
    } while (g_get_monotonic_time() < until);
    return false;
}

/* A vCPU waiting for its reply reads and dispatches one message, unless another
 * thread is reading (READ_BUSY). Other waiting vCPUs are woken afterwards, so
 * that one of them takes over reading. */
static enum read_result read_as_vcpu(struct vcpu *v, unsigned generation, int wait_ms)
{
    if (!g_mutex_trylock(&read_lock)) {
        return READ_BUSY;
    }
    enum read_result got = READ_BROKEN;
    g_mutex_lock(&conn.write_lock);
    int fd = conn.generation == generation ? conn.fd : -1;
    g_mutex_unlock(&conn.write_lock);
    if (fd >= 0) {
        /* after a busy-poll that saw input, no second look */
        got = cfg.spin_us && spin_for_input(fd) ? READ_DONE : wait_for_input(fd, wait_ms);
        if (got == READ_DONE) {
            got = read_one_message(fd, generation, v->rx);
        }
        if (got == READ_BROKEN) {
            shutdown(fd, SHUT_RDWR); /* the reader thread cleans up */
            __atomic_store_n(&read_broken, true, __ATOMIC_RELEASE);
        }
    }
    g_mutex_unlock(&read_lock);
    if (__atomic_load_n(&direct_readers, __ATOMIC_ACQUIRE) > 1) {
        for (unsigned i = 0; i < MAX_VCPUS; i++) {
            struct vcpu *o = &vcpus[i];
            if (o != v && __atomic_load_n(&o->present, __ATOMIC_ACQUIRE)) {
                g_mutex_lock(&o->lock);
                if (o->waiting) {
                    g_cond_signal(&o->cond);
                }
                g_mutex_unlock(&o->lock);
            }
        }
    }
    return got;
}

/* The reader thread leaves the socket to vCPUs while they wait for replies. */
static bool reader_parked(void)
{
    if (__atomic_load_n(&read_broken, __ATOMIC_ACQUIRE)) {
        return false;
    }
    return __atomic_load_n(&direct_readers, __ATOMIC_ACQUIRE) > 0 ||
           g_get_monotonic_time() - __atomic_load_n(&last_direct, __ATOMIC_ACQUIRE) <
               DIRECT_PARK_US;
}

static void serve_connection(int fd, unsigned generation)
{
    uint8_t *payload = g_malloc(MAX_INCOMING);

    for (;;) {
        if (reader_parked()) {
            g_usleep(DIRECT_PARK_US / 2);
            flush_batch(BATCH_FLUSH_MS * 1000);
            continue;
        }
        struct pollfd pfd = { .fd = fd, .events = POLLIN };
        int ready = poll(&pfd, 1, BATCH_FLUSH_MS);
        if (ready == 0) {
            flush_batch(0); /* quiet introspector: push out batched events */
            continue;
        }
        if (ready < 0 && errno == EINTR) {
            continue;
        }
        /* Readable, but a waiting vCPU may take the message first: look again. */
        g_mutex_lock(&read_lock);
        enum read_result got = ready < 0 ? READ_BROKEN : wait_for_input(fd, 0);
        if (got == READ_DONE) {
            got = read_one_message(fd, generation, payload);
        }
        g_mutex_unlock(&read_lock);
        if (got == READ_BROKEN) {
            break;
        }
    }
    g_free(payload);
}

static gpointer connection_thread(gpointer unused)
{
    gint64 give_up = deadline_after(cfg.connect_timeout_ms);
    bool ever_connected = false;

    for (;;) {
        if (__atomic_load_n(&conn.exiting, __ATOMIC_ACQUIRE)) {
            break;
        }
        int fd = connect_socket();
        if (fd < 0) {
            if (!cfg.reconnect && (ever_connected || g_get_monotonic_time() > give_up)) {
                logmsg("cannot connect to %s: %s; the guest runs without introspection",
                       cfg.socket_path, strerror(errno));
                break;
            }
            g_usleep(ever_connected ? 1000000 : 100000);
            continue;
        }
        if (!handshake(fd)) {
            close(fd);
            if (!cfg.reconnect) {
                break;
            }
            g_usleep(1000000);
            continue;
        }
        ever_connected = true;
        set_connection(fd);
        logmsg("connected to introspector at %s", cfg.socket_path);
        serve_connection(fd, current_generation());
        if (!__atomic_load_n(&conn.exiting, __ATOMIC_ACQUIRE)) {
            logmsg("introspector disconnected; the guest runs on%s",
                   cfg.reconnect ? " (reconnecting)" : "");
        }
        set_connection(-1);
        reset_session_state();
        if (!cfg.reconnect) {
            break;
        }
    }
    /* Wake anything waiting for a connection that will never come. */
    g_mutex_lock(&conn.write_lock);
    g_cond_broadcast(&conn.changed);
    g_mutex_unlock(&conn.write_lock);
    return NULL;
}

/* VM shutdown: UNHOOK (if enabled), give the introspector a moment, close. */
static void on_qemu_exit(qemu_plugin_id_t id, void *userdata)
{
    __atomic_store_n(&conn.exiting, true, __ATOMIC_RELEASE);
    if (connected() && (__atomic_load_n(&conn.vm_events, __ATOMIC_RELAXED) &
                        (1u << KVMI_EVENT_UNHOOK))) {
        struct kvmi_event ev = { .size = sizeof(ev), .event = KVMI_EVENT_UNHOOK };
        uint32_t seq = __atomic_add_fetch(&event_seq, 1, __ATOMIC_RELAXED);
        if (send_message(0, KVMI_EVENT, seq, false, &ev, sizeof(ev), NULL, 0, NULL, 0)) {
            gint64 deadline = deadline_after(MIN(cfg.reply_timeout_ms, UNHOOK_WAIT_MS));
            g_mutex_lock(&conn.write_lock);
            while (conn.fd >= 0 &&
                   g_cond_wait_until(&conn.changed, &conn.write_lock, deadline)) {
            }
            g_mutex_unlock(&conn.write_lock);
        }
    }
    g_mutex_lock(&conn.write_lock);
    if (conn.fd >= 0) {
        flush_batch_locked();
        shutdown(conn.fd, SHUT_RDWR);
    }
    g_mutex_unlock(&conn.write_lock);
}

/* ------------------------------------------------------------------ install */

static bool parse_uuid(const char *text, uint8_t out[16])
{
    unsigned n = 0;
    for (const char *p = text; *p; p++) {
        if (*p == '-') {
            continue;
        }
        int hi = g_ascii_xdigit_value(p[0]);
        int lo = p[1] ? g_ascii_xdigit_value(p[1]) : -1;
        if (hi < 0 || lo < 0 || n >= 16) {
            return false;
        }
        out[n++] = (uint8_t)(hi << 4 | lo);
        p++;
    }
    return n == 16;
}

static bool parse_uint(const char *text, unsigned *out)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(text, &end, 10);
    if (errno || end == text || *end || v > 24ul * 3600 * 1000) {
        return false;
    }
    *out = (unsigned)v;
    return true;
}

static bool parse_args(int argc, char **argv)
{
    for (int i = 0; i < argc; i++) {
        char *eq = strchr(argv[i], '=');
        if (!eq) {
            logmsg("argument '%s' is not key=value", argv[i]);
            return false;
        }
        *eq = '\0';
        const char *key = argv[i], *val = eq + 1;
        bool ok = true;
        if (!strcmp(key, "socket")) {
            cfg.socket_path = val;
        } else if (!strcmp(key, "ram")) {
            cfg.ram_path = val;
        } else if (!strcmp(key, "name")) {
            g_strlcpy(cfg.name, val, sizeof(cfg.name));
        } else if (!strcmp(key, "uuid")) {
            ok = parse_uuid(val, cfg.uuid);
        } else if (!strcmp(key, "reconnect")) {
            ok = qemu_plugin_bool_parse(key, val, &cfg.reconnect);
        } else if (!strcmp(key, "hold")) {
            ok = qemu_plugin_bool_parse(key, val, &cfg.hold);
        } else if (!strcmp(key, "verbose")) {
            ok = qemu_plugin_bool_parse(key, val, &verbose);
        } else if (!strcmp(key, "reply_timeout_ms")) {
            ok = parse_uint(val, &cfg.reply_timeout_ms) && cfg.reply_timeout_ms > 0;
        } else if (!strcmp(key, "spin_us")) {
            ok = parse_uint(val, &cfg.spin_us) && cfg.spin_us <= MAX_SPIN_US;
        } else if (!strcmp(key, "connect_timeout_ms")) {
            ok = parse_uint(val, &cfg.connect_timeout_ms);
        } else if (!strcmp(key, "hold_timeout_ms")) {
            ok = parse_uint(val, &cfg.hold_timeout_ms);
        } else if (!strcmp(key, "cookie")) {
            cfg.cookie = val;
        } else {
            logmsg("unknown option '%s'", key);
            return false;
        }
        if (!ok) {
            logmsg("bad value for option %s: '%s'", key, val);
            return false;
        }
    }
    if (!cfg.socket_path) {
        logmsg("the socket=PATH option is required");
        return false;
    }
    return true;
}

static bool map_ram(void)
{
    int fd = open(cfg.ram_path, O_RDWR | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0 || st.st_size <= 0) {
        logmsg("cannot open guest RAM file %s: %s", cfg.ram_path, strerror(errno));
        if (fd >= 0) {
            close(fd);
        }
        return false;
    }
    void *p = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (p == MAP_FAILED) {
        logmsg("cannot map guest RAM file %s: %s", cfg.ram_path, strerror(errno));
        return false;
    }
    ram = p;
    ram_size = (uint64_t)st.st_size;
    return true;
}

VMITRACE_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc,
                                        char **argv)
{
    if (!info->system_emulation || strcmp(info->target_name, "x86_64") != 0) {
        logmsg("only x86_64 system emulation is supported (got %s)", info->target_name);
        return -1;
    }
    if (!parse_args(argc, argv)) {
        return -1;
    }
    if (cfg.ram_path && !map_ram()) {
        return -1;
    }
    plugin_id = id;
    vcpu_count = (unsigned)info->system.smp_vcpus;
    start_time = (int64_t)time(NULL);
    for (unsigned i = 0; i < MAX_VCPUS; i++) {
        vcpus[i].index = i;
        g_mutex_init(&vcpus[i].lock);
        g_cond_init(&vcpus[i].cond);
        g_queue_init(&vcpus[i].commands);
    }
    conn.batch = g_byte_array_sized_new(BATCH_FLUSH_BYTES + VMITRACE_EVENT_MSG_SIZE + 8);
    breakpoints = g_hash_table_new_full(g_int64_hash, g_int64_equal, free_rule, NULL);
    sites = g_hash_table_new_full(site_hash, site_equal, g_free, NULL);
    attention_board = qemu_plugin_scoreboard_new(sizeof(uint64_t));
    register_callbacks();
    g_thread_unref(g_thread_new("vmitrace-kvmi", connection_thread, NULL));
    return 0;
}

/* int80 workload: a 64-bit process making 32-bit system calls with `int $0x80` (i386 ABI:
 * number in eax, arguments in ebx, ecx, edx; only the low 32 bits of each are seen, so every
 * pointer passed is a static object of this non-PIE binary, below 4 GiB). Syscalls: README.md. */
#define _GNU_SOURCE
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
#include "wl_constants.h"

static const char path[] = WL_INT80_PATH;
static const char payload[] = WL_INT80_PAYLOAD;
static char readback[WL_INT80_PAYLOAD_LEN];

static long int80(long nr, long a, long b, long c)
{
    long ret;
    /* r8-r11: the kernel may zero them on this path (it did before 4.17). */
    __asm__ volatile("int $0x80" : "=a"(ret) : "a"(nr), "b"(a), "c"(b), "d"(c)
                     : "r8", "r9", "r10", "r11", "memory");
    return ret;
}

int main(void)
{
    if ((uintptr_t)path > UINT32_MAX || (uintptr_t)payload > UINT32_MAX)
        return WL_EXIT_MISMATCH;
    long pid = syscall(SYS_getpid);  /* the 64-bit call, as reference */
    if (int80(WL_I386_NR_GETPID, 0, 0, 0) != pid)
        return WL_EXIT_MISMATCH;
    long fd = int80(WL_I386_NR_OPEN, (long)path, WL_INT80_OPEN_FLAGS, WL_INT80_MODE);
    if (fd < 0)
        return WL_EXIT_MISMATCH;
    long written = int80(WL_I386_NR_WRITE, fd, (long)payload, WL_INT80_PAYLOAD_LEN);
    if (int80(WL_I386_NR_CLOSE, fd, 0, 0) != 0 || written != WL_INT80_PAYLOAD_LEN)
        return WL_EXIT_MISMATCH;
    /* Read back with 64-bit calls: the 32-bit ones really wrote the file. */
    fd = syscall(SYS_open, path, 0);
    long got = syscall(SYS_read, fd, readback, sizeof readback);
    if (syscall(SYS_close, fd) != 0 || got != WL_INT80_PAYLOAD_LEN)
        return WL_EXIT_MISMATCH;
    return memcmp(readback, payload, sizeof readback) == 0 ? WL_EXIT_OK : WL_EXIT_MISMATCH;
}

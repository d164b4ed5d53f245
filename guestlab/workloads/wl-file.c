/* file workload: write a fixed file, then read it back. Syscalls: see README.md. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
#include "wl_constants.h"

static char expected[WL_FILE_BYTES];
static char readback[WL_FILE_BYTES];

int main(void)
{
    for (int i = 0; i < WL_FILE_BYTES; i++)
        expected[i] = WL_FILE_PATTERN[i % WL_FILE_PATTERN_LEN];

    long fd = syscall(SYS_openat, AT_FDCWD, WL_FILE_PATH, WL_FILE_WRITE_FLAGS, WL_FILE_MODE);
    if (fd < 0)
        return WL_EXIT_MISMATCH;
    long written = syscall(SYS_write, fd, expected, WL_FILE_BYTES);
    if (syscall(SYS_close, fd) != 0 || written != WL_FILE_BYTES)
        return WL_EXIT_MISMATCH;

    fd = syscall(SYS_openat, AT_FDCWD, WL_FILE_PATH, WL_FILE_READ_FLAGS);
    if (fd < 0)
        return WL_EXIT_MISMATCH;
    long got = syscall(SYS_read, fd, readback, WL_FILE_BYTES);
    if (syscall(SYS_close, fd) != 0 || got != WL_FILE_BYTES)
        return WL_EXIT_MISMATCH;
    return memcmp(expected, readback, WL_FILE_BYTES) == 0 ? WL_EXIT_OK : WL_EXIT_MISMATCH;
}

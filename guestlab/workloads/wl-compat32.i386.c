/* compat32 workload: a 32-bit (i386) process making its system calls through glibc, which
 * enters the kernel by the vDSO's __kernel_vsyscall: `sysenter` or 32-bit `syscall` (by CPU
 * vendor), with the sixth argument left on the user stack. Syscalls: README.md. */
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#include "wl_constants.h"

static const char payload[] = WL_COMPAT32_PAYLOAD;
static char readback[WL_COMPAT32_PAYLOAD_LEN];

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], WL_COMPAT32_SLEEP_ARG) == 0) {
        /* One blocking call to interrupt (SIGSTOP/SIGCONT restart it through the vDSO). */
        struct timespec t = {WL_COMPAT32_SLEEP_S, 0};
        return nanosleep(&t, NULL) == 0 ? WL_EXIT_OK : WL_EXIT_MISMATCH;
    }
    if (getpid() <= 0)
        return WL_EXIT_MISMATCH;
    int fd = open(WL_COMPAT32_PATH, WL_COMPAT32_WRITE_FLAGS, WL_COMPAT32_MODE);
    if (fd < 0 || write(fd, payload, WL_COMPAT32_PAYLOAD_LEN) != WL_COMPAT32_PAYLOAD_LEN ||
        close(fd) != 0)
        return WL_EXIT_MISMATCH;
    fd = open(WL_COMPAT32_PATH, WL_COMPAT32_READ_FLAGS);
    if (fd < 0 || read(fd, readback, sizeof readback) != WL_COMPAT32_PAYLOAD_LEN)
        return WL_EXIT_MISMATCH;
    /* glibc's mmap is mmap2 with the offset in pages: its sixth argument. The mapping lies
     * past the end of the file, which mmap allows; it is never touched. */
    void *map = mmap(NULL, WL_COMPAT32_MAP_LEN, WL_COMPAT32_MAP_PROT, WL_COMPAT32_MAP_FLAGS, fd,
                     (off_t)WL_COMPAT32_MAP_PGOFF * WL_COMPAT32_PAGE_SIZE);
    if (map == MAP_FAILED || munmap(map, WL_COMPAT32_MAP_LEN) != 0 || close(fd) != 0)
        return WL_EXIT_MISMATCH;
    return memcmp(readback, payload, sizeof readback) == 0 ? WL_EXIT_OK : WL_EXIT_MISMATCH;
}

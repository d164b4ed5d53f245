/* compat32 workload: a 32-bit (i386) process making its system calls through glibc, which
 * enters the kernel by the vDSO's __kernel_vsyscall: `sysenter` or 32-bit `syscall` (by CPU
 * vendor), with the sixth argument left on the user stack. Syscalls: README.md. */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>
#include "wl_constants.h"

static const char payload[] = WL_COMPAT32_PAYLOAD;
static char readback[WL_COMPAT32_PAYLOAD_LEN];
static volatile sig_atomic_t ticks;

static void on_tick(int sig)
{
    (void)sig;
    ticks++;
}

static void on_tick_siginfo(int sig, siginfo_t *info, void *context)
{
    (void)sig, (void)info, (void)context;
    ticks++;
}

/* A system call by `int $0x80` itself, not glibc's way through the vDSO. */
static long int80(long nr, long a, long b, long c)
{
    long ret;
    __asm__ volatile("int $0x80" : "=a"(ret) : "a"(nr), "b"(a), "c"(b), "d"(c) : "memory");
    return ret;
}

/* SIGALRM, handled by `action` (no SA_RESTART), interrupts glibc's pause() and then a read
 * of an empty pipe by `int $0x80`: both must fail with EINTR. */
static int interrupted_calls(const struct sigaction *action)
{
    static const struct itimerval tick = {{0, WL_COMPAT32_TICK_US}, {0, WL_COMPAT32_TICK_US}};
    static const struct itimerval off;
    int fds[2];
    char byte;
    if (sigaction(SIGALRM, action, NULL) != 0 || pipe(fds) != 0 ||
        setitimer(ITIMER_REAL, &tick, NULL) != 0)
        return 0;
    int paused = pause() == -1 && errno == EINTR;
    long got = int80(WL_I386_NR_READ, fds[0], (long)&byte, 1);
    return setitimer(ITIMER_REAL, &off, NULL) == 0 && close(fds[0]) == 0 &&
        close(fds[1]) == 0 && paused && got == -WL_EINTR;
}

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], WL_COMPAT32_SIGNALS_ARG) == 0) {
        struct sigaction plain = {.sa_handler = on_tick};  /* the legacy frame */
        struct sigaction siginfo = {.sa_sigaction = on_tick_siginfo, .sa_flags = SA_SIGINFO};
        return interrupted_calls(&plain) && interrupted_calls(&siginfo) ? WL_EXIT_OK
                                                                         : WL_EXIT_MISMATCH;
    }
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

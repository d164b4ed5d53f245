/* signals workload: two signals delivered at the return of one call (README.md). */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
#include "wl_constants.h"

static volatile sig_atomic_t handled[2];
static volatile sig_atomic_t count;

static void on_signal(int sig)
{
    if (count < 2) {
        handled[count] = sig;
    }
    count++;
}

int main(void)
{
    struct sigaction action;
    memset(&action, 0, sizeof(action));
    action.sa_handler = on_signal;  /* sa_mask empty: neither handler blocks the other */
    if (sigaction(SIGUSR1, &action, 0) != 0 || sigaction(SIGUSR2, &action, 0) != 0) {
        return WL_EXIT_MISMATCH;
    }
    sigset_t both, none;
    sigemptyset(&both);
    sigaddset(&both, SIGUSR1);
    sigaddset(&both, SIGUSR2);
    sigemptyset(&none);
    if (sigprocmask(SIG_BLOCK, &both, 0) != 0) {
        return WL_EXIT_MISMATCH;
    }
    long pid = syscall(SYS_getpid);
    if (syscall(SYS_kill, pid, SIGUSR1) != 0 || syscall(SYS_kill, pid, SIGUSR2) != 0) {
        return WL_EXIT_MISMATCH;
    }
    /* Both pending: the call returns EINTR at once, and the kernel builds SIGUSR1's frame,
     * then SIGUSR2's on top of it, whose handler runs first. */
    long ret = syscall(SYS_rt_sigsuspend, &none, WL_KERNEL_SIGSET_BYTES);
    int ok = ret == -1 && errno == EINTR && count == 2 && handled[0] == SIGUSR2 &&
             handled[1] == SIGUSR1;
    return ok ? WL_EXIT_OK : WL_EXIT_MISMATCH;
}

/* exec workload: fork, execve a fixed argv in the child, wait4 for its known exit status. */
#define _GNU_SOURCE
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#include "wl_constants.h"

int main(void)
{
    static char *const argv[] = WL_EXEC_ARGV;
    static char *const envp[] = WL_EXEC_ENVP;

    /* The raw fork system call (not glibc's clone-based fork()) keeps the sequence exact. */
    long pid = syscall(SYS_fork);
    if (pid < 0)
        return WL_EXIT_MISMATCH;
    if (pid == 0) {
        syscall(SYS_execve, WL_EXEC_PATH, argv, envp);
        syscall(SYS_exit_group, 127);
    }
    int status = 0;
    long waited = syscall(SYS_wait4, pid, &status, 0, 0);
    if (waited != pid || !WIFEXITED(status) || WEXITSTATUS(status) != WL_EXEC_EXIT_CODE)
        return WL_EXIT_MISMATCH;
    return WL_EXIT_OK;
}

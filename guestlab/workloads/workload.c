/* The workload driver: `workload once`, `workload steady [period_ms]`, `workload <name>`.
 * Runs each workload binary (WL_DIR/wl-<name>) with fork + execve + wait4 and prints
 * "wl <name> status=<exit status>" per run and "wl round=<n> failures=<k>" per round. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include "wl_constants.h"

static const char *const names[] = WL_NAMES;

static int run_one(const char *name)
{
    char path[256];
    snprintf(path, sizeof(path), "%s/wl-%s", WL_DIR, name);
    pid_t pid = fork();
    if (pid < 0)
        return -1;
    if (pid == 0) {
        char *const argv[] = {path, 0};
        char *const envp[] = {"PATH=/bin:/sbin", 0};
        execve(path, argv, envp);
        _exit(127);
    }
    int status = 0;
    if (waitpid(pid, &status, 0) != pid)
        return -1;
    int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    printf("wl %s status=%d\n", name, code);
    fflush(stdout);
    return code;
}

static int run_round(unsigned long round)
{
    int failures = 0;
    for (int i = 0; names[i]; i++)
        failures += run_one(names[i]) != WL_EXIT_OK;
    printf("wl round=%lu failures=%d\n", round, failures);
    fflush(stdout);
    return failures;
}

static int usage(void)
{
    fprintf(stderr, "usage: workload once | steady [period_ms] | <name>\nnames:");
    for (int i = 0; names[i]; i++)
        fprintf(stderr, " %s", names[i]);
    fprintf(stderr, "\n");
    return 2;
}

int main(int argc, char **argv)
{
    if (argc < 2)
        return usage();
    if (strcmp(argv[1], "once") == 0)
        return run_round(1) == 0 ? WL_EXIT_OK : WL_EXIT_MISMATCH;
    if (strcmp(argv[1], "steady") == 0) {
        long period_ms = argc > 2 ? strtol(argv[2], 0, 10) : WL_STEADY_PERIOD_MS;
        if (period_ms <= 0 || period_ms > 3600000)
            return usage();
        struct timespec next;
        clock_gettime(CLOCK_MONOTONIC, &next);
        for (unsigned long round = 1;; round++) {
            run_round(round);
            /* Fixed-rate schedule: rounds start every period_ms (no drift). */
            next.tv_sec += period_ms / 1000;
            next.tv_nsec += (period_ms % 1000) * 1000000L;
            if (next.tv_nsec >= 1000000000L) {
                next.tv_sec++;
                next.tv_nsec -= 1000000000L;
            }
            clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, 0);
        }
    }
    for (int i = 0; names[i]; i++)
        if (strcmp(argv[1], names[i]) == 0) {
            int code = run_one(names[i]);
            return code < 0 ? WL_EXIT_MISMATCH : code;
        }
    return usage();
}

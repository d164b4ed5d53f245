/* enoent workload: an openat of a missing path must fail with ENOENT. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sys/syscall.h>
#include <unistd.h>
#include "wl_constants.h"

int main(void)
{
    long fd = syscall(SYS_openat, AT_FDCWD, WL_ENOENT_PATH, WL_ENOENT_FLAGS);
    return (fd == -1 && errno == ENOENT) ? WL_EXIT_OK : WL_EXIT_MISMATCH;
}

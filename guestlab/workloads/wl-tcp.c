/* tcp workload: listener and client in one process over 127.0.0.1:WL_TCP_PORT.
 * connect() completes against the listen backlog, so accept() needs no second process. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>
#include "wl_constants.h"

int main(void)
{
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof(addr));
    addr.sin_family = AF_INET;
    addr.sin_port = htons(WL_TCP_PORT);
    if (inet_pton(AF_INET, WL_TCP_ADDRESS, &addr.sin_addr) != 1)
        return WL_EXIT_MISMATCH;
    int one = 1;
    char buf[WL_TCP_PAYLOAD_LEN];

    long server = syscall(SYS_socket, AF_INET, SOCK_STREAM, 0);
    if (server < 0)
        return WL_EXIT_MISMATCH;
    if (syscall(SYS_setsockopt, server, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) != 0)
        return WL_EXIT_MISMATCH;
    if (syscall(SYS_bind, server, &addr, sizeof(addr)) != 0)
        return WL_EXIT_MISMATCH;
    if (syscall(SYS_listen, server, WL_TCP_BACKLOG) != 0)
        return WL_EXIT_MISMATCH;
    long client = syscall(SYS_socket, AF_INET, SOCK_STREAM, 0);
    if (client < 0)
        return WL_EXIT_MISMATCH;
    if (syscall(SYS_connect, client, &addr, sizeof(addr)) != 0)
        return WL_EXIT_MISMATCH;
    long conn = syscall(SYS_accept, server, 0, 0);
    if (conn < 0)
        return WL_EXIT_MISMATCH;
    long sent = syscall(SYS_write, client, WL_TCP_PAYLOAD, WL_TCP_PAYLOAD_LEN);
    long got = syscall(SYS_read, conn, buf, WL_TCP_PAYLOAD_LEN);
    int ok = sent == WL_TCP_PAYLOAD_LEN && got == WL_TCP_PAYLOAD_LEN &&
             memcmp(buf, WL_TCP_PAYLOAD, WL_TCP_PAYLOAD_LEN) == 0;
    ok &= syscall(SYS_close, client) == 0;
    ok &= syscall(SYS_close, conn) == 0;
    ok &= syscall(SYS_close, server) == 0;
    return ok ? WL_EXIT_OK : WL_EXIT_MISMATCH;
}

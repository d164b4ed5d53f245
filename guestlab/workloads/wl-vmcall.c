/* vmcall workload: executes `vmcall` with fixed registers. Without a hypervisor that takes it
 * (TCG included) the CPU raises #UD and the kernel sends SIGILL: the handler skips the
 * instruction and the program carries on. A host plugin sees the instruction either way. */
#define _GNU_SOURCE
#include <signal.h>
#include <string.h>
#include <sys/ucontext.h>
#include <unistd.h>
#include "wl_constants.h"

static void on_fault(int sig, siginfo_t *info, void *context)
{
    (void)sig;
    (void)info;
    ucontext_t *uc = context;
    uc->uc_mcontext.gregs[REG_RIP] += WL_VMCALL_INSN_LEN;
}

int main(void)
{
    struct sigaction action;
    memset(&action, 0, sizeof(action));
    action.sa_sigaction = on_fault;
    action.sa_flags = SA_SIGINFO;
    /* Some hypervisors answer a user-mode vmcall with #GP (SIGSEGV) instead of #UD. */
    if (sigaction(SIGILL, &action, 0) != 0 || sigaction(SIGSEGV, &action, 0) != 0)
        return WL_EXIT_MISMATCH;

    register unsigned long rax __asm__("rax") = WL_VMCALL_RAX;
    register unsigned long rbx __asm__("rbx") = WL_VMCALL_RBX;
    register unsigned long rcx __asm__("rcx") = WL_VMCALL_RCX;
    register unsigned long rdx __asm__("rdx") = WL_VMCALL_RDX;
    register unsigned long rsi __asm__("rsi") = WL_VMCALL_RSI;
    __asm__ volatile("vmcall"
                     : "+r"(rax), "+r"(rbx), "+r"(rcx), "+r"(rdx), "+r"(rsi)
                     :
                     : "memory");
    /* Exit OK both when SIGILL was delivered (TCG) and when a hypervisor returned. */
    return WL_EXIT_OK;
}

/*
 * mdwe: runs a command (or dlopens libraries) under what systemd's
 * MemoryDenyWriteExecute=yes enforces: prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN)
 * (kernel >= 6.3, what systemd >= 254 uses) and the seccomp rules systemd 252 installs
 * instead: mprotect() adding PROT_EXEC and mmap() asking for PROT_WRITE|PROT_EXEC fail
 * with EPERM. Both are inherited across fork and execve.
 *
 *   mdwe CMD ARGS...        exec CMD under the restrictions
 *   mdwe --dlopen LIB...    dlopen each LIB (RTLD_NOW); exit 1 naming the first failure
 *
 * Prints "mdwe: prctl=on" or "mdwe: prctl=unsupported" on stderr first.
 */
#include <dlfcn.h>
#include <errno.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef PR_SET_MDWE
#define PR_SET_MDWE 65
#endif
#ifndef PR_MDWE_REFUSE_EXEC_GAIN
#define PR_MDWE_REFUSE_EXEC_GAIN 1
#endif

static int deny_write_execute(void) {
    struct sock_filter filter[] = {
        /* 0 */ BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        /* 1 */ BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_mprotect, 0, 3),
        /* 2 */ BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[2])),
        /* 3 */ BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, PROT_EXEC, 0, 5),
        /* 4 */ BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
        /* 5 */ BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_mmap, 0, 3),
        /* 6 */ BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[2])),
        /* 7 */ BPF_STMT(BPF_ALU | BPF_AND | BPF_K, PROT_WRITE | PROT_EXEC),
        /* 8 */ BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, PROT_WRITE | PROT_EXEC, 1, 0),
        /* 9 */ BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        /* 10 */ BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
    };
    struct sock_fprog program = {
        .len = (unsigned short)(sizeof(filter) / sizeof(filter[0])),
        .filter = filter,
    };
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) {
        perror("mdwe: PR_SET_NO_NEW_PRIVS");
        return -1;
    }
    if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &program) != 0) {
        perror("mdwe: PR_SET_SECCOMP");
        return -1;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: mdwe CMD ARGS... | mdwe --dlopen LIB...\n");
        return 2;
    }
    int prctl_on = prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) == 0;
    fprintf(stderr, "mdwe: prctl=%s\n", prctl_on ? "on" : "unsupported");
    if (deny_write_execute() != 0) {
        return 1;
    }
    if (strcmp(argv[1], "--dlopen") == 0) {
        for (int i = 2; i < argc; i++) {
            if (dlopen(argv[i], RTLD_NOW | RTLD_LOCAL) == NULL) {
                fprintf(stderr, "mdwe: %s: %s\n", argv[i], dlerror());
                return 1;
            }
        }
        return 0;
    }
    execvp(argv[1], argv + 1);
    perror("mdwe: exec");
    return 127;
}

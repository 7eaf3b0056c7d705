/*
 * failsync: an LD_PRELOAD shim for the fault tests (tests/tests/faults.rs). While the file
 * named by $PLUGIND_TEST_FAIL_FSYNC exists, the calls it names (`fsync`, `fdatasync`,
 * separated by white space; an empty file: both) fail with EIO instead of running, each
 * failure reported on stderr with the file's path ("failsync: fdatasync(/…/ledger.db-wal)
 * fails with EIO"); otherwise they are the real ones.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int (*real_fsync)(int);
static int (*real_fdatasync)(int);

__attribute__((constructor)) static void resolve(void) {
    real_fsync = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    real_fdatasync = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
}

/* Whether `call` on `fd` is to fail; reports it on stderr if so. */
static int failing(const char *call, int fd) {
    const char *flag = getenv("PLUGIND_TEST_FAIL_FSYNC");
    if (flag == NULL || *flag == 0) {
        return 0;
    }
    int f = open(flag, O_RDONLY | O_CLOEXEC);
    if (f < 0) {
        return 0;
    }
    char names[128];
    ssize_t n = read(f, names, sizeof names - 1);
    close(f);
    names[n > 0 ? n : 0] = 0;
    int named = n <= 0;
    char *rest = NULL;
    for (char *name = strtok_r(names, " \t\n", &rest); name != NULL && !named;
         name = strtok_r(NULL, " \t\n", &rest)) {
        named = strcmp(name, call) == 0;
    }
    if (!named) {
        return 0;
    }
    char link[64], path[512], line[700];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t len = readlink(link, path, sizeof path - 1);
    path[len > 0 ? len : 0] = 0;
    int out = snprintf(line, sizeof line, "failsync: %s(%s) fails with EIO\n", call, path);
    if (out > 0 && write(2, line, (size_t)out) < 0) {
        /* Nothing to do: the caller sees the failure anyway. */
    }
    return 1;
}

int fsync(int fd) {
    if (failing("fsync", fd)) {
        errno = EIO;
        return -1;
    }
    return real_fsync(fd);
}

int fdatasync(int fd) {
    if (failing("fdatasync", fd)) {
        errno = EIO;
        return -1;
    }
    return real_fdatasync(fd);
}

/*
 * writelog: an LD_PRELOAD shim that logs every change made to a plugind ledger
 * (`ledger.db`, `ledger.db-wal`) and every fsync of it, for the power-cut simulation
 * (tests/src/powercut.rs reads the log, tests/tests/powercut.rs runs it).
 *
 * The log is the file named by $PLUGIND_TEST_WRITELOG (nothing is logged without it),
 * opened with O_APPEND when the shim is loaded. One record per operation, appended with
 * one write() under a mutex, so records are whole and in the order of their `end` times:
 *
 *   struct header (32 bytes, native endianness: the reader runs on the same machine)
 *     u8  kind     1 write, 2 truncate, 3 fsync, 4 fdatasync, 5 remove (unlink of the path)
 *     u8  file     0 ledger.db, 1 ledger.db-wal
 *     u8  rdonly   1 if the fd was opened O_RDONLY (plugind's syncer opens the log so)
 *     u8  pad
 *     i32 result   0, or -errno of a failed fsync
 *     u64 end      CLOCK_REALTIME ns when the operation had completed (taken under the lock)
 *     u64 a        write: offset; truncate: new length; sync: start time (ns, before the call)
 *     u64 b        write: length (then that many bytes of data follow); else 0
 *
 * A write is logged only for the bytes the call reported written. fds are mapped to files
 * when opened (open, open64, openat, openat64; O_TRUNC logs a truncate to 0) and forgotten
 * when closed. SQLite's unix VFS writes with pwrite64 and truncates with ftruncate64; the
 * other entry points are logged too in case a build uses them. An unlink of a ledger file
 * (SQLite removes the log when its last connection closes) is logged as a remove. Not
 * modelled: mmap'd writes
 * (SQLite maps only the -shm file unless mmap_size is set, which plugind does not do).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

enum { K_WRITE = 1, K_TRUNCATE = 2, K_FSYNC = 3, K_FDATASYNC = 4, K_REMOVE = 5 };

struct header {
    uint8_t kind, file, rdonly, pad;
    int32_t result;
    uint64_t end, a, b;
};

#define MAX_FD 65536
/* 0: not a ledger file; else 1 + file id, + 0x10 if opened read-only. */
static unsigned char tracked[MAX_FD];

static int log_fd = -1;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static int (*real_open)(const char *, int, ...);
static int (*real_open64)(const char *, int, ...);
static int (*real_openat)(int, const char *, int, ...);
static int (*real_openat64)(int, const char *, int, ...);
static int (*real_close)(int);
static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_writev)(int, const struct iovec *, int);
static ssize_t (*real_pwrite)(int, const void *, size_t, off_t);
static ssize_t (*real_pwrite64)(int, const void *, size_t, off64_t);
static int (*real_ftruncate)(int, off_t);
static int (*real_ftruncate64)(int, off64_t);
static int (*real_fsync)(int);
static int (*real_fdatasync)(int);
static off64_t (*real_lseek64)(int, off64_t, int);
static int (*real_unlink)(const char *);
static int (*real_unlinkat)(int, const char *, int);

static void die(const char *what) {
    char line[256];
    int n = snprintf(line, sizeof line, "writelog: %s: %s\n", what, strerror(errno));
    if (n > 0 && real_write != NULL && real_write(2, line, (size_t)n) < 0) {
        /* nothing more to say */
    }
    abort();
}

static void resolve(void) {
    if (real_write != NULL) {
        return;
    }
    real_open = dlsym(RTLD_NEXT, "open");
    real_open64 = dlsym(RTLD_NEXT, "open64");
    real_openat = dlsym(RTLD_NEXT, "openat");
    real_openat64 = dlsym(RTLD_NEXT, "openat64");
    real_close = dlsym(RTLD_NEXT, "close");
    real_writev = dlsym(RTLD_NEXT, "writev");
    real_pwrite = dlsym(RTLD_NEXT, "pwrite");
    real_pwrite64 = dlsym(RTLD_NEXT, "pwrite64");
    real_ftruncate = dlsym(RTLD_NEXT, "ftruncate");
    real_ftruncate64 = dlsym(RTLD_NEXT, "ftruncate64");
    real_fsync = dlsym(RTLD_NEXT, "fsync");
    real_fdatasync = dlsym(RTLD_NEXT, "fdatasync");
    real_lseek64 = dlsym(RTLD_NEXT, "lseek64");
    real_unlink = dlsym(RTLD_NEXT, "unlink");
    real_unlinkat = dlsym(RTLD_NEXT, "unlinkat");
    real_write = dlsym(RTLD_NEXT, "write");
}

__attribute__((constructor)) static void init(void) {
    resolve();
    const char *path = getenv("PLUGIND_TEST_WRITELOG");
    if (path == NULL || *path == 0) {
        return;
    }
    log_fd = real_open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (log_fd < 0) {
        die("cannot open $PLUGIND_TEST_WRITELOG");
    }
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* The file id (0 or 1) of `path` by its last component, or -1. */
static int file_of(const char *path) {
    if (path == NULL) {
        return -1;
    }
    const char *slash = strrchr(path, '/');
    const char *name = slash ? slash + 1 : path;
    if (strcmp(name, "ledger.db") == 0) {
        return 0;
    }
    if (strcmp(name, "ledger.db-wal") == 0) {
        return 1;
    }
    return -1;
}

static void write_all(const void *data, size_t len) {
    const char *p = data;
    while (len > 0) {
        ssize_t n = real_write(log_fd, p, len);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            die("cannot append to the write log");
        }
        p += n;
        len -= (size_t)n;
    }
}

/* Appends one record; `end` is taken under the lock so that the log is in `end` order.
 * The data of a write is `iov` (iovcnt pieces, `len` bytes in all, logged up to `len`). */
static void record(uint8_t kind, unsigned char t, int32_t result, uint64_t a, uint64_t len,
                   const struct iovec *iov, int iovcnt) {
    struct header h;
    memset(&h, 0, sizeof h);
    h.kind = kind;
    h.file = (uint8_t)((t - 1) & 0x0f);
    h.rdonly = (t & 0x10) ? 1 : 0;
    h.result = result;
    h.a = a;
    h.b = kind == K_WRITE ? len : 0;
    int saved = errno;
    pthread_mutex_lock(&lock);
    h.end = now_ns();
    write_all(&h, sizeof h);
    uint64_t left = len;
    for (int i = 0; i < iovcnt && left > 0; i++) {
        size_t n = iov[i].iov_len < left ? iov[i].iov_len : (size_t)left;
        write_all(iov[i].iov_base, n);
        left -= n;
    }
    pthread_mutex_unlock(&lock);
    errno = saved;
}

static unsigned char tracking(int fd) {
    if (log_fd < 0 || fd < 0 || fd >= MAX_FD) {
        return 0;
    }
    return __atomic_load_n(&tracked[fd], __ATOMIC_ACQUIRE);
}

static void log_write(int fd, const void *buf, ssize_t written, uint64_t offset) {
    unsigned char t = tracking(fd);
    if (t == 0 || written <= 0) {
        return;
    }
    struct iovec one = {(void *)buf, (size_t)written};
    record(K_WRITE, t, 0, offset, (uint64_t)written, &one, 1);
}

/* After an open of `path` returned `fd`. */
static int opened(int fd, const char *path, int flags) {
    if (fd < 0 || log_fd < 0) {
        return fd;
    }
    int file = file_of(path);
    if (fd >= MAX_FD) {
        if (file >= 0) {
            errno = EMFILE;
            die("a ledger file got an fd past the shim's table");
        }
        return fd;
    }
    unsigned char t = 0;
    if (file >= 0) {
        t = (unsigned char)(1 + file) | ((flags & O_ACCMODE) == O_RDONLY ? 0x10 : 0);
    }
    __atomic_store_n(&tracked[fd], t, __ATOMIC_RELEASE);
    if (t != 0 && (flags & O_TRUNC) && (flags & O_ACCMODE) != O_RDONLY) {
        record(K_TRUNCATE, t, 0, 0, 0, NULL, 0);
    }
    return fd;
}

static mode_t mode_arg(int flags, va_list ap) {
    if ((flags & O_CREAT) || (flags & __O_TMPFILE) == __O_TMPFILE) {
        return (mode_t)va_arg(ap, int);
    }
    return 0;
}

int open(const char *path, int flags, ...) {
    resolve();
    va_list ap;
    va_start(ap, flags);
    mode_t mode = mode_arg(flags, ap);
    va_end(ap);
    return opened(real_open(path, flags, mode), path, flags);
}

int open64(const char *path, int flags, ...) {
    resolve();
    va_list ap;
    va_start(ap, flags);
    mode_t mode = mode_arg(flags, ap);
    va_end(ap);
    return opened(real_open64(path, flags, mode), path, flags);
}

int openat(int dir, const char *path, int flags, ...) {
    resolve();
    va_list ap;
    va_start(ap, flags);
    mode_t mode = mode_arg(flags, ap);
    va_end(ap);
    return opened(real_openat(dir, path, flags, mode), path, flags);
}

int openat64(int dir, const char *path, int flags, ...) {
    resolve();
    va_list ap;
    va_start(ap, flags);
    mode_t mode = mode_arg(flags, ap);
    va_end(ap);
    return opened(real_openat64(dir, path, flags, mode), path, flags);
}

int close(int fd) {
    resolve();
    if (fd >= 0 && fd < MAX_FD) {
        __atomic_store_n(&tracked[fd], 0, __ATOMIC_RELEASE);
    }
    return real_close(fd);
}

ssize_t pwrite64(int fd, const void *buf, size_t len, off64_t offset) {
    resolve();
    ssize_t n = real_pwrite64(fd, buf, len, offset);
    log_write(fd, buf, n, (uint64_t)offset);
    return n;
}

ssize_t pwrite(int fd, const void *buf, size_t len, off_t offset) {
    resolve();
    ssize_t n = real_pwrite(fd, buf, len, offset);
    log_write(fd, buf, n, (uint64_t)offset);
    return n;
}

ssize_t write(int fd, const void *buf, size_t len) {
    resolve();
    if (tracking(fd) == 0) {
        return real_write(fd, buf, len);
    }
    off64_t offset = real_lseek64(fd, 0, SEEK_CUR);
    ssize_t n = real_write(fd, buf, len);
    log_write(fd, buf, n, (uint64_t)offset);
    return n;
}

ssize_t writev(int fd, const struct iovec *iov, int iovcnt) {
    resolve();
    unsigned char t = tracking(fd);
    if (t == 0) {
        return real_writev(fd, iov, iovcnt);
    }
    off64_t offset = real_lseek64(fd, 0, SEEK_CUR);
    ssize_t n = real_writev(fd, iov, iovcnt);
    if (n > 0) {
        record(K_WRITE, t, 0, (uint64_t)offset, (uint64_t)n, iov, iovcnt);
    }
    return n;
}

static void log_truncate(int fd, int result, uint64_t length) {
    unsigned char t = tracking(fd);
    if (t != 0 && result == 0) {
        record(K_TRUNCATE, t, 0, length, 0, NULL, 0);
    }
}

int ftruncate(int fd, off_t length) {
    resolve();
    int r = real_ftruncate(fd, length);
    log_truncate(fd, r, (uint64_t)length);
    return r;
}

int ftruncate64(int fd, off64_t length) {
    resolve();
    int r = real_ftruncate64(fd, length);
    log_truncate(fd, r, (uint64_t)length);
    return r;
}

static int synced(uint8_t kind, int fd, uint64_t start, int r) {
    unsigned char t = tracking(fd);
    if (t != 0) {
        record(kind, t, r == 0 ? 0 : -errno, start, 0, NULL, 0);
    }
    return r;
}

int fsync(int fd) {
    resolve();
    uint64_t start = now_ns();
    return synced(K_FSYNC, fd, start, real_fsync(fd));
}

int fdatasync(int fd) {
    resolve();
    uint64_t start = now_ns();
    return synced(K_FDATASYNC, fd, start, real_fdatasync(fd));
}

static void log_remove(const char *path, int r) {
    int file = file_of(path);
    if (r == 0 && file >= 0 && log_fd >= 0) {
        record(K_REMOVE, (unsigned char)(1 + file), 0, 0, 0, NULL, 0);
    }
}

int unlink(const char *path) {
    resolve();
    int r = real_unlink(path);
    log_remove(path, r);
    return r;
}

int unlinkat(int dir, const char *path, int flags) {
    resolve();
    int r = real_unlinkat(dir, path, flags);
    log_remove(path, r);
    return r;
}

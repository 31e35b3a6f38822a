/* bench/files.c: remote-file figures for `bench/run`.
 *   files small PATH SECONDS  -> "OPS" open + read 4 KiB + close per second
 *   files seq PATH            -> "MBPS" open + sequential 1 MiB reads to EOF + close
 * The same binary reads the same path with libgraft_layer.so (remote: the agent
 * reads it in the target's root) and without it (local). */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: files small|seq PATH [SECONDS]\n"); return 2; }
    static char buf[1 << 20];
    if (strcmp(argv[1], "small") == 0) {
        double secs = argc > 3 ? atof(argv[3]) : 3, start = now(), t;
        long ops = 0;
        do {
            for (int i = 0; i < 16; i++, ops++) {
                int fd = open(argv[2], O_RDONLY);
                if (fd < 0) { perror("open"); return 1; }
                if (read(fd, buf, 4096) != 4096) { perror("read"); return 1; }
                close(fd);
            }
        } while ((t = now()) - start < secs);
        printf("%.0f\n", ops / (t - start));
    } else {
        double start = now();
        long total = 0;
        ssize_t got;
        int fd = open(argv[2], O_RDONLY);
        if (fd < 0) { perror("open"); return 1; }
        while ((got = read(fd, buf, sizeof buf)) > 0) total += got;
        if (got < 0) { perror("read"); return 1; }
        close(fd);
        printf("%.1f\n", total / 1e6 / (now() - start));
    }
    return 0;
}

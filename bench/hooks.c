/* bench/hooks.c: the cost per call of libc functions the layer hooks but leaves
 * alone (local fds, local paths, loopback), timed with clock_gettime in a tight
 * loop. `bench/run` runs it with and without libgraft_layer.so.
 * Usage: hooks ITERATIONS; prints "NAME NS_PER_CALL" lines. */
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 1000000;
    char buf[1];
    int zero = open("/dev/zero", O_RDONLY);
    if (zero < 0) { perror("open /dev/zero"); return 1; }

    double t = now();
    for (long i = 0; i < n; i++)
        if (read(zero, buf, 1) != 1) { perror("read"); return 1; }
    printf("read(/dev/zero,1)_unhooked %.1f\n", (now() - t) / n);

    t = now();
    for (long i = 0; i < n; i++) {
        int fd = dup(zero);
        if (fd < 0 || close(fd) != 0) { perror("dup/close"); return 1; }
    }
    printf("close(dup(fd)) %.1f\n", (now() - t) / n);

    t = now();
    for (long i = 0; i < n; i++) {
        int fd = open("/dev/null", O_RDONLY);
        if (fd < 0 || close(fd) != 0) { perror("open/close"); return 1; }
    }
    printf("open(/dev/null)+close %.1f\n", (now() - t) / n);

    int udp = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in lo = {.sin_family = AF_INET, .sin_port = htons(9)};
    lo.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    t = now();
    for (long i = 0; i < n; i++)
        if (connect(udp, (struct sockaddr *)&lo, sizeof lo) != 0) { perror("connect"); return 1; }
    printf("connect(udp,127.0.0.1) %.1f\n", (now() - t) / n);
    return 0;
}

/* bench/hooks.c: the cost per call of libc functions the layer hooks but leaves
 * alone (local fds, local paths, loopback), timed with clock_gettime in a tight
 * loop. `bench/run` runs it with and without libgraft_layer.so.
 *
 * Each figure is the fastest of ROUNDS rounds of ITERATIONS/ROUNDS calls: an
 * interrupt, a migration or a neighbour's burst only ever adds time, so the
 * fastest round is the one that measured the calls alone. With a single long
 * loop those additions made the difference with and without the layer swing by
 * ±50 ns from run to run, more than the layer's own cost.
 *
 * Usage: hooks ITERATIONS [ROUNDS]; prints "NAME NS_PER_CALL" lines. */
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

static long per_round;
static int rounds;
static int zero, udp;
static struct sockaddr_in lo;

static int read_one(void) {
    char buf[1];
    return read(zero, buf, 1) == 1 ? 0 : -1;
}

static int dup_close(void) {
    int fd = dup(zero);
    return fd < 0 || close(fd) != 0 ? -1 : 0;
}

static int open_close(void) {
    int fd = open("/dev/null", O_RDONLY);
    return fd < 0 || close(fd) != 0 ? -1 : 0;
}

static int connect_udp(void) {
    return connect(udp, (struct sockaddr *)&lo, sizeof lo);
}

/* Prints the fastest round's ns per call of `call`; exits on its first error. */
static void measure(const char *name, int (*call)(void)) {
    double best = 0;
    for (int r = 0; r < rounds; r++) {
        double t = now();
        for (long i = 0; i < per_round; i++)
            if (call() != 0) { perror(name); exit(1); }
        double ns = (now() - t) / per_round;
        if (r == 0 || ns < best) best = ns;
    }
    printf("%s %.1f\n", name, best);
}

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 1000000;
    rounds = argc > 2 ? atoi(argv[2]) : 20;
    if (rounds < 1 || n < rounds) { fprintf(stderr, "usage: hooks ITERATIONS [ROUNDS]\n"); return 2; }
    per_round = n / rounds;
    zero = open("/dev/zero", O_RDONLY);
    if (zero < 0) { perror("open /dev/zero"); return 1; }
    udp = socket(AF_INET, SOCK_DGRAM, 0);
    if (udp < 0) { perror("socket"); return 1; }
    lo.sin_family = AF_INET;
    lo.sin_port = htons(9);
    lo.sin_addr.s_addr = htonl(INADDR_LOOPBACK);

    measure("read(/dev/zero,1)_unhooked", read_one);
    measure("close(dup(fd))", dup_close);
    measure("open(/dev/null)+close", open_close);
    measure("connect(udp,127.0.0.1)", connect_udp);
    return 0;
}

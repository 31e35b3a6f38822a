/* bench/copies.c: the floor of the mirror rows of `bench/run`: what the copies
 * of a mirrored port cost the target's own clients when nothing captures them.
 * A mirror must at least hand each of the target's requests to the local
 * program, over a socket, on the same CPUs, and the local program must answer
 * it; this program does only that: it sends RATE requests a second to the
 * local server at HOST:PORT over CONNS keep-alive connections (loopback TCP,
 * as graft's copies to a local program), while `bench/paced.c` times the
 * target's clients at the same rate.
 *
 * The requests go out as graft's sniffing mirror hands them on: every BLOCK_US
 * microseconds, the ones that fell due in that time, in turn over the
 * connections, with a sched_yield(2) after each write (graft's mirror thread
 * gives its CPU away there too); BLOCK_US 0 sends each request when it is due.
 * The answers are read (and thrown away) before the next write on the same
 * connection, never waited for: the copy's sender wakes only for its clock.
 *
 * usage: copies HOST PORT RATE CONNS SECS BLOCK_US   (HOST an IPv4 address)
 * prints: COPIES sent answered-bytes
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static const char REQUEST[] = "GET / HTTP/1.1\r\nHost: copy\r\nUser-Agent: bench-copies\r\n\r\n";

static long long now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1000000000LL + t.tv_nsec;
}

int main(int argc, char **argv) {
  if (argc != 7) {
    fprintf(stderr, "usage: copies HOST PORT RATE CONNS SECS BLOCK_US\n");
    return 2;
  }
  int rate = atoi(argv[3]), conns = atoi(argv[4]), secs = atoi(argv[5]);
  long long block = atoll(argv[6]) * 1000LL;
  if (rate <= 0 || conns <= 0 || conns > 1024 || secs <= 0 || block < 0) {
    fprintf(stderr, "copies: RATE, CONNS (at most 1024) and SECS must be positive\n");
    return 2;
  }
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
  if (inet_pton(AF_INET, argv[1], &a.sin_addr) != 1) {
    fprintf(stderr, "copies: HOST must be an IPv4 address\n");
    return 2;
  }
  int fds[1024], one = 1;
  for (int i = 0; i < conns; i++) {
    fds[i] = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(fds[i], (void *)&a, sizeof a)) {
      perror("copies: connect");
      return 1;
    }
    setsockopt(fds[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  }
  long long interval = 1000000000LL / rate, start = now_ns(), end = start + secs * 1000000000LL;
  long long next_due = start, sent = 0, answered = 0;
  static char sink[65536];
  int turn = 0;
  while (next_due < end) {
    /* Sleep until the block (or the request) is due: an absolute deadline, so
     * the rate holds whatever the work of each wake-up. */
    long long wake = block ? next_due - (next_due - start) % block + block : next_due;
    struct timespec t = {.tv_sec = wake / 1000000000LL, .tv_nsec = wake % 1000000000LL};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &t, 0) == EINTR) {
    }
    long long now = now_ns();
    while (next_due <= now && next_due < end) {
      int fd = fds[turn];
      turn = (turn + 1) % conns;
      ssize_t r;
      while ((r = recv(fd, sink, sizeof sink, MSG_DONTWAIT)) > 0) answered += r;
      if (r == 0 || write(fd, REQUEST, sizeof REQUEST - 1) != (ssize_t)(sizeof REQUEST - 1)) {
        fprintf(stderr, "copies: the local server closed a connection\n");
        return 1;
      }
      sched_yield();
      sent++;
      next_due += interval;
    }
  }
  printf("COPIES %lld %lld\n", sent, answered);
  return 0;
}

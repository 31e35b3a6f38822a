/* bench/relay.c: the floor of the filtered-steal rows of `bench/run`: the least
 * a process that relays each request costs, so the filtered rows can be read
 * against what any relay costs on the same machine and not only against the
 * server reached directly. A filtered steal puts a process between the client
 * and the target (graft's agent reads each request to route it); this relay
 * does the same hop with nothing else: one thread, one epoll set, a read and a
 * write per chunk, no parsing, no routing, the upstream connection made from
 * the relay's own address.
 *
 * Each accepted connection gets its own connection to UPSTREAM:UPORT; bytes
 * go both ways as they come, and either side's end (or error) closes both.
 * The sockets are blocking and the relay reads only what epoll says is there,
 * so a write waits until the peer takes the chunk: a slow reader holds up the
 * relay, which is fine for a bench client that reads every answer at once.
 *
 * usage: relay PORT UPSTREAM UPORT   (listens on 0.0.0.0:PORT, UPSTREAM an
 *   IPv4 address)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

/* Descriptors the relay tracks (its peers are indexed by descriptor). */
#define MAXFD 65536

static int peer[MAXFD];

/* Writes all of buf to fd; -1 when the peer is gone. */
static int write_all(int fd, const char *buf, ssize_t len) {
  while (len > 0) {
    ssize_t w = write(fd, buf, len);
    if (w <= 0) return -1;
    buf += w;
    len -= w;
  }
  return 0;
}

int main(int argc, char **argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: relay PORT UPSTREAM UPORT\n");
    return 2;
  }
  int one = 1;
  int l = socket(AF_INET, SOCK_STREAM, 0);
  setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
  struct sockaddr_in u = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[3]))};
  if (inet_pton(AF_INET, argv[2], &u.sin_addr) != 1) {
    fprintf(stderr, "relay: UPSTREAM must be an IPv4 address\n");
    return 2;
  }
  if (bind(l, (void *)&a, sizeof a) || listen(l, 4096)) {
    perror("relay: listen");
    return 1;
  }
  int ep = epoll_create1(0);
  struct epoll_event ev = {.events = EPOLLIN, .data.fd = l};
  epoll_ctl(ep, EPOLL_CTL_ADD, l, &ev);
  struct epoll_event evs[256];
  static char buf[65536];
  for (;;) {
    int n = epoll_wait(ep, evs, 256, -1);
    for (int i = 0; i < n; i++) {
      int fd = evs[i].data.fd;
      if (fd == l) {
        int c = accept(l, 0, 0);
        if (c < 0) continue;
        int s = socket(AF_INET, SOCK_STREAM, 0);
        if (c >= MAXFD || s >= MAXFD || connect(s, (void *)&u, sizeof u)) {
          close(c);
          close(s);
          continue;
        }
        setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        peer[c] = s;
        peer[s] = c;
        struct epoll_event ec = {.events = EPOLLIN, .data.fd = c};
        struct epoll_event es = {.events = EPOLLIN, .data.fd = s};
        epoll_ctl(ep, EPOLL_CTL_ADD, c, &ec);
        epoll_ctl(ep, EPOLL_CTL_ADD, s, &es);
        continue;
      }
      if (peer[fd] < 0) continue; /* closed earlier in this batch */
      ssize_t r = read(fd, buf, sizeof buf);
      if (r <= 0 || write_all(peer[fd], buf, r) < 0) {
        int p = peer[fd];
        close(fd);
        close(p);
        peer[fd] = peer[p] = -1;
      }
    }
  }
}

/* bench/paced.c: the open-loop HTTP/1.1 client of `bench/run`: requests at a
 * fixed rate, evenly spaced, over CONNS keep-alive connections, for the rows
 * that ask what graft adds to a server that is not saturated (wrk keeps every
 * connection busy, so on two cores its tail is mostly queueing behind
 * whatever else runs).
 *
 * Each request's latency counts from the moment it was due, not from when a
 * free connection sent it, so a stall shows in full in the tail instead of
 * delaying the requests that would have measured it ("coordinated omission";
 * wrk2 measures the same way). A request due while every connection is busy
 * waits for the first one free; free connections take requests in turn (a
 * queue, not a stack), so that all CONNS of them carry traffic.
 *
 * Before the clock starts, every connection carries one request whose answer
 * is not timed (a warm-up, as wrk2's calibration period): the rows measure a
 * server's steady state, and what a new connection costs has rows of its own.
 * CONNS 0 measures exactly that: each request opens its own connection when it
 * is due, and its latency counts the connect, the request and the answer; the
 * client then closes it with a reset (SO_LINGER 0). A normal close would leave
 * it in TIME_WAIT for a minute on this side, and once some 12 000 of them wait
 * toward one server the kernel finds no free port for the next connect and
 * new connections stall for seconds (seen on this bench's machine, with and
 * without graft).
 *
 * usage: paced HOST PORT RATE CONNS SECS [HEADER]
 *   HOST: an IPv4 address; RATE: requests per second; CONNS: keep-alive
 *   connections, or 0 for a new connection per request (at most 1024 open at
 *   once); HEADER: one more request header line ("Name: value"), e.g. a
 *   filter's.
 * prints: RESULT p50 p99 p999 requests errors
 *   (latencies in µs, the line bench/latency.lua makes wrk print).
 *
 * The answer's length comes from its Content-Length (RFC 9112 section 6.3);
 * an answer without one, a closed connection or a failed write counts as an
 * error and retires the connection.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define BUF 8192
#define BACKLOG (1u << 16) /* due requests waiting for a connection, at most */
#define NEW_SLOTS 1024     /* connections open at once with CONNS 0 */

struct conn {
  int fd;
  int busy;       /* a request is out (or, connecting, due) */
  int connecting; /* CONNS 0: the connect has not completed */
  uint64_t due; /* ns, CLOCK_MONOTONIC */
  size_t len;   /* bytes buffered */
  char buf[BUF];
};

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int cmp_u64(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return x < y ? -1 : x > y;
}

/* Counts an error and stops using connection c. */
static void retire(int ep, struct conn *c, long *alive, uint64_t *errors) {
  (*errors)++;
  epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
  close(c->fd);
  c->fd = -1;
  (*alive)--;
}

/* Length of the whole answer in buf[0..len), 0 if not all of its head is in,
 * -1 if it has no usable Content-Length. */
static long answer_len(const char *buf, size_t len) {
  const char *end = memmem(buf, len, "\r\n\r\n", 4);
  if (!end) return len >= BUF ? -1 : 0;
  size_t head = (size_t)(end - buf) + 4;
  for (const char *p = buf; p < end;) {
    const char *eol = memmem(p, (size_t)(end - p) + 2, "\r\n", 2);
    if (!eol) break;
    if ((size_t)(eol - p) > 15 && strncasecmp(p, "content-length:", 15) == 0) {
      long body = strtol(p + 15, NULL, 10);
      return body < 0 || head + (size_t)body > BUF ? -1 : (long)(head + (size_t)body);
    }
    p = eol + 2;
  }
  return -1;
}

/* Reads what connection c has. 1: a whole answer came to the request out (it
 * is consumed from c's buffer and c is free); 0: not all of it yet; -1: the
 * connection broke, or sent something that is no answer to a request out. */
static int read_answer(struct conn *c) {
  ssize_t r = read(c->fd, c->buf + c->len, BUF - c->len);
  if (r < 0 && errno == EAGAIN) return 0;
  if (r <= 0) return -1;
  c->len += (size_t)r;
  long whole = answer_len(c->buf, c->len);
  if (whole == 0 || (whole > 0 && c->len < (size_t)whole)) return 0;
  if (whole < 0 || !c->busy) return -1;
  memmove(c->buf, c->buf + whole, c->len - (size_t)whole);
  c->len -= (size_t)whole;
  c->busy = 0;
  return 1;
}

/* A queue of free connection indexes: a ring of nconns + 1 slots. */
struct fifo {
  long *slot;
  long cap, head, tail;
};
static void put(struct fifo *q, long i) { q->slot[q->tail++ % q->cap] = i; }
static long take(struct fifo *q) { return q->slot[q->head++ % q->cap]; }
static long queued(const struct fifo *q) { return q->tail - q->head; }

/* Sends the request on connection c, due at `due`; 0, or -1 if the write failed. */
static int send_request(struct conn *c, uint64_t due, const char *request, int reqlen) {
  c->due = due;
  c->busy = 1;
  return write(c->fd, request, (size_t)reqlen) == reqlen ? 0 : -1;
}

/* CONNS 0: closes c's connection with a reset, leaving no TIME_WAIT. */
static void close_reset(struct conn *c) {
  struct linger l = {.l_onoff = 1, .l_linger = 0};
  setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
  close(c->fd);
  c->fd = -1;
}

/* CONNS 0: opens c's connection, non-blocking; its request goes once it is up. */
static int open_new(int ep, struct conn *c, long i, const struct sockaddr_in *addr) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return -1;
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  if (connect(fd, (const struct sockaddr *)addr, sizeof *addr) < 0 && errno != EINPROGRESS) {
    close(fd);
    return -1;
  }
  c->fd = fd;
  c->connecting = 1;
  c->len = 0;
  struct epoll_event ev = {.events = EPOLLOUT, .data.u64 = (uint64_t)i};
  epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
  return 0;
}

/* Counts an error on connection i: with CONNS 0 its slot is free again, else
 * the connection is retired. */
static void fail(int ep, struct conn *c, long i, int fresh, struct fifo *idle, long *alive,
                 uint64_t *errors) {
  if (!fresh) {
    retire(ep, c, alive, errors);
    return;
  }
  (*errors)++;
  close_reset(c);
  c->busy = 0;
  put(idle, i);
}

int main(int argc, char **argv) {
  if (argc < 6) {
    fprintf(stderr, "usage: paced HOST PORT RATE CONNS SECS [HEADER]\n");
    return 2;
  }
  struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[2]))};
  if (inet_pton(AF_INET, argv[1], &addr.sin_addr) != 1) {
    fprintf(stderr, "paced: %s is not an IPv4 address\n", argv[1]);
    return 2;
  }
  long rate = atol(argv[3]), nconns = atol(argv[4]), secs = atol(argv[5]);
  if (rate <= 0 || rate > 1000000 || nconns < 0 || nconns > 10000 || secs <= 0) {
    fprintf(stderr, "paced: RATE 1..1000000, CONNS 0..10000, SECS > 0\n");
    return 2;
  }
  int fresh = nconns == 0; /* a new connection per request */
  if (fresh) nconns = NEW_SLOTS;
  char request[512];
  int reqlen = snprintf(request, sizeof request, "GET / HTTP/1.1\r\nHost: %s\r\n%s%s\r\n", argv[1],
                        argc > 6 ? argv[6] : "", argc > 6 ? "\r\n" : "");
  if (reqlen <= 0 || (size_t)reqlen >= sizeof request) {
    fprintf(stderr, "paced: the header is too long\n");
    return 2;
  }

  int ep = epoll_create1(EPOLL_CLOEXEC);
  struct conn *conns = calloc((size_t)nconns, sizeof *conns);
  struct fifo idle = {calloc((size_t)nconns + 1, sizeof(long)), nconns + 1, 0, 0};
  long alive = 0;
  uint64_t errors = 0;
  for (long i = 0; i < nconns; i++) {
    conns[i].fd = -1;
    put(&idle, i);
    if (fresh) continue;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
      perror("paced: connect");
      return 1;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    conns[i].fd = fd;
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)i};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    alive++;
  }

  /* The warm-up: one untimed request on every connection, all answered. */
  uint64_t warm_until = now_ns() + 10000000000u;
  long warming = 0;
  if (!fresh) {
    while (queued(&idle) > 0) {
      struct conn *c = &conns[take(&idle)];
      if (send_request(c, 0, request, reqlen) < 0) retire(ep, c, &alive, &errors);
      else warming++;
    }
  }
  while (warming > 0 && now_ns() < warm_until) {
    struct epoll_event evs[64];
    int n = epoll_wait(ep, evs, 64, 100);
    for (int k = 0; k < n; k++) {
      struct conn *c = &conns[evs[k].data.u64];
      int got = read_answer(c);
      if (got == 0) continue;
      warming--;
      if (got < 0) retire(ep, c, &alive, &errors);
      else put(&idle, (long)(c - conns));
    }
  }
  if (warming > 0) {
    fprintf(stderr, "paced: %ld connections never answered the warm-up request\n", warming);
    return 1;
  }

  uint64_t interval = 1000000000u / (uint64_t)rate;
  int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
  uint64_t start = now_ns() + 1000000u; /* the first request 1 ms from now */
  struct itimerspec its = {
      .it_value = {.tv_sec = (time_t)(start / 1000000000u), .tv_nsec = (long)(start % 1000000000u)},
      .it_interval = {.tv_sec = (time_t)(interval / 1000000000u), .tv_nsec = (long)(interval % 1000000000u)},
  };
  timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL);
  struct epoll_event tev = {.events = EPOLLIN, .data.u64 = UINT64_MAX};
  epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &tev);

  uint64_t stop = start + (uint64_t)secs * 1000000000u;
  size_t cap = (size_t)rate * (size_t)secs + 16, done = 0;
  uint64_t *lat = malloc(cap * sizeof *lat);
  uint64_t *due = malloc(BACKLOG * sizeof *due); /* a ring of due times */
  size_t head = 0, tail = 0;
  uint64_t ticks = 0;
  int scheduling = 1;

  while (scheduling || (fresh ? queued(&idle) < nconns : queued(&idle) < alive)) {
    struct epoll_event evs[64];
    int n = epoll_wait(ep, evs, 64, 100);
    if (n < 0 && errno != EINTR) {
      perror("paced: epoll_wait");
      return 1;
    }
    uint64_t t = now_ns();
    if (!scheduling && t > stop + 2000000000u) break; /* answers that never came */
    for (int k = 0; k < n; k++) {
      if (evs[k].data.u64 == UINT64_MAX) {
        uint64_t expired;
        if (read(tfd, &expired, sizeof expired) != sizeof expired) continue;
        for (; expired > 0 && scheduling; expired--) {
          uint64_t at = start + ticks * interval;
          ticks++;
          if (at >= stop) {
            scheduling = 0;
            break;
          }
          if (tail - head == BACKLOG) {
            errors++; /* hopelessly behind: dropped, and counted */
          } else {
            due[tail++ % BACKLOG] = at;
          }
        }
        continue;
      }
      long i = (long)evs[k].data.u64;
      struct conn *c = &conns[i];
      if (c->connecting) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)i};
        c->connecting = 0;
        if (err != 0 || epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev) < 0 ||
            send_request(c, c->due, request, reqlen) < 0) {
          fail(ep, c, i, fresh, &idle, &alive, &errors);
        }
        continue;
      }
      int got = read_answer(c);
      if (got == 0) continue;
      if (got < 0) {
        fail(ep, c, i, fresh, &idle, &alive, &errors);
        continue;
      }
      if (done < cap) lat[done++] = t - c->due;
      if (fresh) close_reset(c);
      put(&idle, i);
    }
    /* Send what is due on free connections, oldest first. */
    while (head != tail && queued(&idle) > 0) {
      long i = take(&idle);
      struct conn *c = &conns[i];
      if (fresh) {
        c->due = due[head++ % BACKLOG];
        c->busy = 1;
        if (open_new(ep, c, i, &addr) < 0) {
          errors++;
          c->busy = 0;
          put(&idle, i);
          break; /* out of descriptors or ports: try again on the next event */
        }
        continue;
      }
      if (c->fd < 0) continue;
      if (send_request(c, due[head++ % BACKLOG], request, reqlen) < 0) {
        retire(ep, c, &alive, &errors);
      }
    }
    if (!fresh && alive == 0) break;
  }
  errors += tail - head; /* due, never sent */

  qsort(lat, done, sizeof *lat, cmp_u64);
#define PCT(p) (done ? lat[(size_t)((double)(done - 1) * (p) / 100.0)] / 1000 : 0)
  printf("RESULT %lu %lu %lu %zu %lu\n", (unsigned long)PCT(50), (unsigned long)PCT(99),
         (unsigned long)PCT(99.9), done, (unsigned long)errors);
  return 0;
}

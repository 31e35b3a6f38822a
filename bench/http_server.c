/* bench/http_server.c: the native HTTP/1.1 server of `bench/run`, for the
 * target and for the local program alike, so that the latency rows show what
 * graft adds, not what a slow server hides (a Python server spends ~350 µs per
 * request; this one a few µs).
 *
 * One thread, one epoll set, non-blocking sockets, keep-alive and pipelining:
 * every complete request in the read buffer is answered, in order, with
 * "200 OK" and BODY + "\n". A request is its header block (up to the blank line,
 * RFC 9112 section 2.1) plus a Content-Length body, which is read and dropped;
 * chunked request bodies are not supported (wrk, curl -d and the bench send
 * none). A header block over 64 KiB or a malformed Content-Length closes the
 * connection.
 *
 * Usage: http_server PORT [BODY]   (listens on 0.0.0.0:PORT)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUF 65536

struct conn {
  int fd;
  size_t len;        /* bytes in buf */
  size_t skip;       /* body bytes still to drop */
  char buf[BUF];
};

static char response[512];
static size_t response_len;

/* Content-Length of the header block [p, p+n), 0 if absent, -1 if malformed. */
static long content_length(const char *p, size_t n) {
  const char *end = p + n;
  while (p < end) {
    const char *eol = memmem(p, end - p, "\r\n", 2);
    if (!eol) eol = end;
    if (eol - p > 15 && strncasecmp(p, "content-length:", 15) == 0) {
      char *stop;
      long v = strtol(p + 15, &stop, 10);
      if (v < 0 || (stop != eol && *stop != ' ' && *stop != '\r')) return -1;
      return v;
    }
    p = eol + 2;
  }
  return 0;
}

/* Answers every complete request in c->buf; returns -1 to close. */
static int serve(struct conn *c) {
  char out[64 * 512];
  size_t out_len = 0, off = 0;
  for (;;) {
    if (c->skip) {
      size_t take = c->len - off < c->skip ? c->len - off : c->skip;
      off += take;
      c->skip -= take;
      if (c->skip) break;
    }
    char *head = c->buf + off;
    char *blank = memmem(head, c->len - off, "\r\n\r\n", 4);
    if (!blank) {
      if (c->len - off >= BUF) return -1;
      break;
    }
    long body = content_length(head, blank - head);
    if (body < 0) return -1;
    off = (blank + 4) - c->buf;
    c->skip = (size_t)body;
    if (out_len + response_len > sizeof out) {
      if (write(c->fd, out, out_len) != (ssize_t)out_len) return -1;
      out_len = 0;
    }
    memcpy(out + out_len, response, response_len);
    out_len += response_len;
  }
  memmove(c->buf, c->buf + off, c->len - off);
  c->len -= off;
  /* Responses are a few hundred bytes and the socket buffer is empty between
   * requests: a short write only happens to a client that stopped reading. */
  if (out_len && write(c->fd, out, out_len) != (ssize_t)out_len) return -1;
  return 0;
}

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: %s PORT [BODY]\n", argv[0]);
    return 2;
  }
  const char *body = argc > 2 ? argv[2] : "local bench";
  response_len = snprintf(response, sizeof response,
                          "HTTP/1.1 200 OK\r\nContent-Length: %zu\r\nContent-Type: text/plain\r\n\r\n%s\n",
                          strlen(body) + 1, body);
  signal(SIGPIPE, SIG_IGN);

  int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  int one = 1;
  setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
  if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) || listen(lfd, 4096)) {
    perror("http_server: bind/listen");
    return 1;
  }
  int ep = epoll_create1(EPOLL_CLOEXEC);
  struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
  epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);

  struct epoll_event events[256];
  for (;;) {
    int n = epoll_wait(ep, events, 256, -1);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      perror("http_server: epoll_wait");
      return 1;
    }
    for (int i = 0; i < n; i++) {
      struct conn *c = events[i].data.ptr;
      if (!c) {
        int fd;
        while ((fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0) {
          setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
          struct conn *nc = malloc(sizeof *nc);
          if (!nc) {
            close(fd);
            continue;
          }
          nc->fd = fd;
          nc->len = nc->skip = 0;
          struct epoll_event cev = {.events = EPOLLIN | EPOLLRDHUP, .data.ptr = nc};
          epoll_ctl(ep, EPOLL_CTL_ADD, fd, &cev);
        }
        continue;
      }
      int done = 0;
      for (;;) {
        ssize_t r = read(c->fd, c->buf + c->len, BUF - c->len);
        if (r > 0) {
          c->len += r;
          if (serve(c) < 0) {
            done = 1;
            break;
          }
          if (c->len < BUF) continue;
          done = 1; /* a header block that fills the buffer */
          break;
        }
        if (r == 0 || (errno != EAGAIN && errno != EINTR)) done = 1;
        if (r < 0 && errno == EINTR) continue;
        break;
      }
      if (done) {
        close(c->fd);
        free(c);
      }
    }
  }
}

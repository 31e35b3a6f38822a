/* bench/bulk_server.c: an HTTP/1.1 server whose answers are large, for the
 * bench's mirror row of a target that serves downloads: what the mirror's
 * capture costs the target when most of the target's bytes are its answers
 * (which a mirror copies to nobody).
 *
 * One thread per connection, blocking sockets, keep-alive: each request (its
 * header block, up to the blank line of RFC 9112 section 2.1; request bodies
 * are not supported, wrk sends none) is answered with "200 OK" and SIZE bytes.
 * A header block over 16 KiB closes the connection.
 *
 * Usage: bulk_server PORT SIZE   (listens on 0.0.0.0:PORT; SIZE in bytes)
 */
#define _GNU_SOURCE
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define HEAD_MAX 16384

static char *answer;
static size_t answer_len;

static int write_all(int fd, const char *p, size_t n) {
  while (n) {
    ssize_t w = write(fd, p, n);
    if (w <= 0) return -1;
    p += w;
    n -= (size_t)w;
  }
  return 0;
}

static void *serve(void *arg) {
  int fd = (int)(long)arg;
  char buf[HEAD_MAX];
  size_t len = 0;
  for (;;) {
    char *blank;
    while ((blank = memmem(buf, len, "\r\n\r\n", 4)) != NULL) {
      if (write_all(fd, answer, answer_len)) goto out;
      size_t used = (size_t)(blank + 4 - buf);
      memmove(buf, buf + used, len - used);
      len -= used;
    }
    if (len == sizeof buf) break;
    ssize_t r = read(fd, buf + len, sizeof buf - len);
    if (r <= 0) break;
    len += (size_t)r;
  }
out:
  close(fd);
  return NULL;
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s PORT SIZE\n", argv[0]);
    return 2;
  }
  size_t size = strtoul(argv[2], NULL, 10);
  char head[128];
  int head_len = snprintf(head, sizeof head,
                          "HTTP/1.1 200 OK\r\nContent-Length: %zu\r\nContent-Type: application/octet-stream\r\n\r\n",
                          size);
  answer_len = (size_t)head_len + size;
  answer = malloc(answer_len);
  if (!answer) return 1;
  memcpy(answer, head, (size_t)head_len);
  memset(answer + head_len, 'x', size);
  signal(SIGPIPE, SIG_IGN);

  int lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  int one = 1;
  setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
  if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) || listen(lfd, 1024)) {
    perror("bulk_server: bind/listen");
    return 1;
  }
  for (;;) {
    int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
    if (fd < 0) continue;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    pthread_t t;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    if (pthread_create(&t, &attr, serve, (void *)(long)fd)) close(fd);
    pthread_attr_destroy(&attr);
  }
}

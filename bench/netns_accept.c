/* bench/netns_accept.c: the floor of the steal's new-connection rows of
 * `bench/run`: what a stolen connection would cost if the program accepted it
 * straight from a listener in the target's network namespace, with no agent or
 * proxy between the kernel and the program's `accept`. graft does not do this
 * yet: today the agent accepts each stolen connection and passes it, and the
 * proxy wakes the program with a loopback connection (the hand-over). This
 * floor is the figure that design is measured against.
 *
 * An LD_PRELOAD shim for an unmodified epoll server that accepts non-blocking
 * (bench/http_server.c; a blocking `accept` would wait on its own listener
 * only):
 *
 * - When the program adds to an epoll set (`EPOLL_CTL_ADD`) its listening
 *   socket bound to port $NETNS_ACCEPT_PORT, the shim enters the namespace
 *   $NETNS_ACCEPT_NETNS on this thread (setns(2) with CLONE_NEWNET moves the
 *   calling thread only), makes a listener there on 0.0.0.0:$NETNS_ACCEPT_TO,
 *   returns to its own namespace, and adds that listener to the same epoll set
 *   with the same `epoll_event` data: the program's loop sees it as its own
 *   listener. A socket keeps the namespace it was made in (socket(7),
 *   network_namespaces(7)).
 * - `accept4` and `accept` of the program's listener take a connection from
 *   the namespace's listener first (non-blocking), then from the program's own,
 *   so local clients still get through and a drained queue still says EAGAIN.
 *
 * bench/run sends the target's port to $NETNS_ACCEPT_TO with a nat REDIRECT in
 * the target's namespace, as graft's agent does for a steal, and removes it
 * afterwards. Errors end the program with a message: a floor that silently
 * measured the program's own listener would be wrong.
 *
 * build: cc -O2 -shared -fPIC -o netns_accept.so bench/netns_accept.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

/* The program's listener, and the namespace's listener mirrored onto it. */
static int program_listener = -1, netns_listener = -1;

static void die(const char *what) {
  perror(what);
  _exit(1);
}

static int env_int(const char *name) {
  const char *v = getenv(name);
  if (!v) {
    fprintf(stderr, "netns_accept: %s is not set\n", name);
    _exit(1);
  }
  return atoi(v);
}

/* The IPv4 port fd is bound to, or -1. */
static int bound_port(int fd) {
  struct sockaddr_in a;
  socklen_t n = sizeof a;
  if (getsockname(fd, (struct sockaddr *)&a, &n) || a.sin_family != AF_INET) return -1;
  return ntohs(a.sin_port);
}

static int is_listener(int fd) {
  int on = 0;
  socklen_t n = sizeof on;
  return getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &on, &n) == 0 && on;
}

/* A listener on 0.0.0.0:$NETNS_ACCEPT_TO inside $NETNS_ACCEPT_NETNS. */
static int listen_in_netns(void) {
  const char *path = getenv("NETNS_ACCEPT_NETNS");
  if (!path) die("netns_accept: NETNS_ACCEPT_NETNS");
  int own = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
  int target = open(path, O_RDONLY | O_CLOEXEC);
  if (own < 0 || target < 0) die("netns_accept: open the namespaces");
  if (setns(target, CLONE_NEWNET)) die("netns_accept: setns into the target");
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(env_int("NETNS_ACCEPT_TO"))};
  if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) || listen(fd, 4096))
    die("netns_accept: listen in the target");
  if (setns(own, CLONE_NEWNET)) die("netns_accept: setns back");
  close(own);
  close(target);
  return fd;
}

int epoll_ctl(int ep, int op, int fd, struct epoll_event *event) {
  static int (*real)(int, int, int, struct epoll_event *);
  if (!real) real = (int (*)(int, int, int, struct epoll_event *))dlsym(RTLD_NEXT, "epoll_ctl");
  if (op == EPOLL_CTL_ADD && program_listener < 0 && bound_port(fd) == env_int("NETNS_ACCEPT_PORT") &&
      is_listener(fd)) {
    program_listener = fd;
    netns_listener = listen_in_netns();
    if (real(ep, op, netns_listener, event)) die("netns_accept: epoll_ctl");
  }
  return real(ep, op, fd, event);
}

int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags) {
  static int (*real)(int, struct sockaddr *, socklen_t *, int);
  if (!real) real = (int (*)(int, struct sockaddr *, socklen_t *, int))dlsym(RTLD_NEXT, "accept4");
  if (fd == program_listener && netns_listener >= 0) {
    int c = real(netns_listener, addr, len, flags | SOCK_NONBLOCK);
    if (c >= 0) {
      if (!(flags & SOCK_NONBLOCK)) fcntl(c, F_SETFL, fcntl(c, F_GETFL) & ~O_NONBLOCK);
      return c;
    }
  }
  return real(fd, addr, len, flags);
}

int accept(int fd, struct sockaddr *addr, socklen_t *len) { return accept4(fd, addr, len, 0); }

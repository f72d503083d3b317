/* The floor: the least a proxy on this machine can do per operation, for the load harness
 * (bench.py builds it with `cc -O2` and runs it as the contender `floor`).
 *
 *   floor http PORT PAGE_FILE [ORIGIN_PORT]
 *       answers a request with the bytes of PAGE_FILE (a complete HTTP response), keep-alive,
 *       or closes after it when the request says `Connection: close`. With ORIGIN_PORT, a
 *       request whose Host has a '-' (the harness's filed names all do, its unfiled ones never)
 *       is passed to 127.0.0.1:ORIGIN_PORT instead, over one origin connection per client
 *       connection, and whatever the origin sends is passed back.
 *   floor tls PORT [ORIGIN_PORT]
 *       reads until a complete TLS record is in; then answers a fatal access_denied alert and
 *       closes, or, with ORIGIN_PORT and a '-' in the ClientHello's server_name, connects
 *       there, passes the bytes on and relays both ways until both sides have closed (a FIN is
 *       passed on as a FIN).
 *
 * One thread, one epoll, edge-triggered, TCP_DEFER_ACCEPT and accept4 in a loop, read and write
 * (no splice): no registry, no parsing beyond finding the end of the request and its Host, no
 * timers, no logs. What a proxy costs above this is its own; what this costs is the kernel's and
 * cannot be removed by any proxy's code. Enough for the harness's clients, not a proxy: a
 * request is expected whole in one read, and a write that would block waits in poll(2). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#define BUF 16384
#define MAXFD 65536
static char page[65536], page_close[65600];
static size_t page_len, page_close_len;
static int tls_mode, origin_port, ep, one = 1;
static const char alert[] = {0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x31};

/* Per descriptor: its peer (0: none), whether it is an origin side, and whether its reading
 * side has seen EOF (then passed on to the peer as a FIN). */
static int peer[MAXFD];
static unsigned char is_origin[MAXFD], eof_in[MAXFD];

static void die(const char *what) { perror(what); exit(1); }

static void watch(int fd) {
    struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP | EPOLLET, .data.fd = fd};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
}

static void drop(int fd) {
    int p = peer[fd];
    peer[fd] = 0, eof_in[fd] = 0, is_origin[fd] = 0;
    close(fd);
    if (p) {
        peer[p] = 0, eof_in[p] = 0, is_origin[p] = 0;
        close(p);
    }
}

/* Writes all of buf; 0 on success. */
static int write_all(int fd, const char *buf, size_t n) {
    while (n) {
        ssize_t w = write(fd, buf, n);
        if (w > 0) { buf += w; n -= (size_t)w; continue; }
        if (w < 0 && errno == EAGAIN) {
            struct pollfd p = {.fd = fd, .events = POLLOUT};
            if (poll(&p, 1, 5000) == 1) continue;
        }
        return -1;
    }
    return 0;
}

/* The origin connection of client fd c, connected on first use (loopback: a blocking connect
 * is one system call and done when it returns). */
static int origin_of(int c) {
    if (peer[c]) return peer[c];
    int o = socket(AF_INET, SOCK_STREAM, 0);
    if (o < 0 || o >= MAXFD) { if (o >= 0) close(o); return -1; }
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(origin_port)};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    if (connect(o, (struct sockaddr *)&a, sizeof a)) { close(o); return -1; }
    fcntl(o, F_SETFL, O_NONBLOCK);
    setsockopt(o, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    peer[c] = o, peer[o] = c, is_origin[o] = 1;
    watch(o);
    return o;
}

/* Relays n bytes read from fd to its peer; 0: keep, -1: both closed. */
static int relay(int fd, const char *buf, size_t n) {
    if (!peer[fd] || write_all(peer[fd], buf, n)) { drop(fd); return -1; }
    return 0;
}

/* fd's reading side saw EOF: pass it on; both sides done closes both. */
static void end_of(int fd) {
    int p = peer[fd];
    if (!p || eof_in[p]) { drop(fd); return; }
    eof_in[fd] = 1;
    shutdown(p, SHUT_WR);
}

/* Whether the server_name of the ClientHello in this record (whole, n bytes) has a '-'. */
static int sni_filed(const unsigned char *b, size_t n) {
    size_t i = 5 + 4 + 2 + 32; /* record and handshake headers, version, random */
    if (i >= n) return 0;
    i += 1 + b[i];                           /* session id */
    if (i + 2 > n) return 0;
    i += 2 + (size_t)(b[i] << 8 | b[i + 1]); /* cipher suites */
    if (i >= n) return 0;
    i += 1 + b[i];                           /* compression methods */
    i += 2;                                  /* extensions' length */
    while (i + 4 <= n) {
        size_t type = (size_t)(b[i] << 8 | b[i + 1]), len = (size_t)(b[i + 2] << 8 | b[i + 3]);
        i += 4;
        if (i + len > n) return 0;
        if (type == 0) /* server_name: list length (2), name type (1), name length (2), name */
            return len > 5 && memchr(b + i + 5, '-', len - 5) != NULL;
        i += len;
    }
    return 0;
}

/* 1: handled and keep the connection, 0: closed it, -1: needs more bytes. */
static int serve(int fd, char *buf, size_t n) {
    if (is_origin[fd] || (tls_mode && peer[fd])) return relay(fd, buf, n) ? 0 : 1;
    if (tls_mode) {
        if (n < 5 || n < 5 + (size_t)(((unsigned char)buf[3] << 8) | (unsigned char)buf[4])) return -1;
        if (origin_port && sni_filed((const unsigned char *)buf, n)) {
            int o = origin_of(fd);
            if (o < 0) { close(fd); return 0; }
            return relay(fd, buf, n) ? 0 : 1;
        }
        if (write(fd, alert, sizeof alert) < 0) {}
        close(fd);
        return 0;
    }
    buf[n] = 0;
    char *end = memmem(buf, n, "\r\n\r\n", 4);
    if (!end) return -1;
    if (origin_port) {
        char *h = memmem(buf, (size_t)(end - buf), "\nHost:", 6);
        char *eol = h ? memchr(h + 1, '\n', (size_t)(end + 2 - h)) : NULL;
        if (eol && memchr(h, '-', (size_t)(eol - h))) {
            int o = origin_of(fd);
            if (o < 0) { drop(fd); return 0; }
            return relay(fd, buf, n) ? 0 : 1;
        }
    }
    if (memmem(buf, n, "Connection: close", 17) || memmem(buf, n, "connection: close", 17)) {
        /* the answer and the FIN in one segment, as icp-gate sends them */
        if (send(fd, page_close, page_close_len, MSG_MORE) < 0) {}
        drop(fd);
        return 0;
    }
    if (write(fd, page, page_len) < 0) { drop(fd); return 0; }
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: floor http PORT PAGE_FILE [ORIGIN_PORT] | tls PORT [ORIGIN_PORT]\n");
        return 2;
    }
    tls_mode = strcmp(argv[1], "tls") == 0;
    const char *origin_arg = tls_mode ? (argc > 3 ? argv[3] : NULL) : (argc > 4 ? argv[4] : NULL);
    origin_port = origin_arg ? atoi(origin_arg) : 0;
    if (!tls_mode) {
        if (argc < 4) die("floor http: PAGE_FILE missing");
        int pf = open(argv[3], O_RDONLY);
        if (pf < 0) die(argv[3]);
        ssize_t r = read(pf, page, sizeof page);
        if (r <= 0) die("page");
        page_len = (size_t)r;
        close(pf);
        /* the same answer saying `connection: close` after its status line */
        char *eol = memmem(page, page_len, "\r\n", 2);
        if (!eol) die("page: no status line");
        size_t first = (size_t)(eol - page) + 2;
        memcpy(page_close, page, first);
        memcpy(page_close + first, "connection: close\r\n", 19);
        memcpy(page_close + first + 19, page + first, page_len - first);
        page_close_len = page_len + 19;
    }
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), defer = 10;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(ls, IPPROTO_TCP, TCP_DEFER_ACCEPT, &defer, sizeof defer);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 4096)) die("bind");
    ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = ls}, evs[256];
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    static char buf[BUF + 1];
    for (;;) {
        int k = epoll_wait(ep, evs, 256, -1);
        for (int i = 0; i < k; i++) {
            int fd = evs[i].data.fd;
            if (fd == ls) {
                int c;
                while ((c = accept4(ls, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    if (c >= MAXFD) { close(c); continue; }
                    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    /* deferred: the first bytes are usually in already */
                    ssize_t n = read(c, buf, BUF);
                    int st = n > 0 ? serve(c, buf, (size_t)n) : (n == 0 ? (close(c), 0) : -1);
                    if (st != 0) watch(c);
                }
                continue;
            }
            /* an event for a descriptor closed earlier in this batch (as a peer) reads EBADF */
            for (;;) {
                ssize_t n = read(fd, buf, BUF);
                if (n == 0) { end_of(fd); break; }
                if (n < 0) { if (errno != EAGAIN) drop(fd); break; }
                if (serve(fd, buf, (size_t)n) == 0) break;
                if ((size_t)n < BUF) break; /* drained: edge-triggered epoll wakes us again */
            }
        }
    }
}

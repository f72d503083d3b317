/* The floor: the least a proxy on this machine can do per operation, for the load harness
 * (bench.py builds it with `cc -O2` and runs it as the contender `floor`).
 *
 *   floor http PORT PAGE_FILE   answers every request with the bytes of PAGE_FILE (a complete
 *                               HTTP response), keep-alive, or closes after it when the request
 *                               says `Connection: close`.
 *   floor tls PORT              reads until a complete TLS record is in, answers a fatal
 *                               access_denied alert and closes.
 *
 * One thread, one epoll, edge-triggered, TCP_DEFER_ACCEPT and accept4 in a loop: no decision,
 * no registry, no parsing beyond finding the end of the request. What a proxy costs above this
 * is its own; what this costs is the kernel's and cannot be removed by any proxy's code. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#define BUF 16384
static char page[65536], page_close[65600];
static size_t page_len, page_close_len;
static int tls_mode;
static const char alert[] = {0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x31};

static void die(const char *what) { perror(what); exit(1); }

/* 1: answered and keep the connection, 0: closed it, -1: needs more bytes. */
static int serve(int fd, char *buf, size_t n) {
    if (tls_mode) {
        if (n < 5 || n < 5 + (((unsigned char)buf[3] << 8) | (unsigned char)buf[4])) return -1;
        if (write(fd, alert, sizeof alert) < 0) {}
        close(fd);
        return 0;
    }
    buf[n] = 0;
    if (!memmem(buf, n, "\r\n\r\n", 4)) return -1;
    if (memmem(buf, n, "Connection: close", 17) || memmem(buf, n, "connection: close", 17)) {
        /* the answer and the FIN in one segment, as icp-gate sends them */
        if (send(fd, page_close, page_close_len, MSG_MORE) < 0) {}
        close(fd);
        return 0;
    }
    if (write(fd, page, page_len) < 0) { close(fd); return 0; }
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: floor http|tls PORT [PAGE_FILE]\n"); return 2; }
    tls_mode = strcmp(argv[1], "tls") == 0;
    if (!tls_mode) {
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
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1, defer = 10;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(ls, IPPROTO_TCP, TCP_DEFER_ACCEPT, &defer, sizeof defer);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 4096)) die("bind");
    int ep = epoll_create1(0);
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
                    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    /* deferred: the first bytes are usually in already */
                    ssize_t n = read(c, buf, BUF);
                    int st = n > 0 ? serve(c, buf, (size_t)n) : (n == 0 ? (close(c), 0) : -1);
                    if (st != 0) {
                        struct epoll_event ce = {.events = EPOLLIN | EPOLLET, .data.fd = c};
                        epoll_ctl(ep, EPOLL_CTL_ADD, c, &ce);
                    }
                }
                continue;
            }
            for (;;) { /* requests that arrive whole; enough for the harness's clients */
                ssize_t n = read(fd, buf, BUF);
                if (n == 0 || (n < 0 && errno != EAGAIN)) { close(fd); break; }
                if (n < 0 || serve(fd, buf, (size_t)n) == 0) break;
                if ((size_t)n < BUF) break; /* drained: edge-triggered epoll wakes us again */
            }
        }
    }
}

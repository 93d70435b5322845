/* The router benchmark's harness in C: an instant fake SGLang worker and a closed-loop load generator.
 *
 * Why C: on a 2-core machine the harness shares the CPUs with the router it measures; the Python harness
 * (bench/router_fake.py) costs about as much CPU per request as our router, this one a fraction of it.
 *
 *   harness serve PORT ANSWERS ROLE
 *       ANSWERS: file of records "PATH STREAM LENGTH\n" + LENGTH bytes (a whole HTTP response each).
 *       ROLE prefill|decode requires "bootstrap_room" in POST bodies (400 otherwise); GET answers 200 {}.
 *   harness load N CONCURRENCY REQUESTS LATENCIES STREAM PORT [PORT]
 *       REQUESTS: file of records "LENGTH\n" + LENGTH bytes (whole HTTP requests, used in turn).
 *       With two ports each request goes to both and completes when both answered (PD "direct").
 *       Writes one latency in seconds per line to LATENCIES; prints "REQ_PER_S ERRORS".
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BUF 65536

static void die(const char *what) { perror(what); exit(1); }

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void nodelay(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) die(path);
    fseek(f, 0, SEEK_END);
    *len = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *data = malloc(*len + 1);
    if (fread(data, 1, *len, f) != *len) die("read");
    data[*len] = 0;
    fclose(f);
    return data;
}

/* Content-Length of a head (case-insensitive), -1 if absent. */
static long content_length(const char *head, size_t n) {
    static const char key[] = "\r\ncontent-length:";
    for (size_t i = 0; i + sizeof key - 1 <= n; i++)
        if (strncasecmp(head + i, key, sizeof key - 1) == 0) return strtol(head + i + sizeof key - 1, NULL, 10);
    return -1;
}

static void write_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR || errno == EAGAIN) continue;
            return;
        }
        p += w;
        n -= (size_t)w;
    }
}

/* ------------------------------------------------------------------ fake worker */
struct answer { char path[64]; int stream; char *data; size_t len; };
static struct answer answers[16];
static int n_answers;

static const char BAD[] = "HTTP/1.1 400 Bad Request\r\ncontent-length: 2\r\n\r\n{}";
static const char NOTFOUND[] = "HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\n{}";
static const char OK_GET[] = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";

struct sconn { int fd; char buf[BUF]; size_t have; };

static void serve_requests(struct sconn *c, int need_room) {
    static char out[8 * BUF];
    size_t out_len = 0, pos = 0;
    for (;;) {
        char *end = memmem(c->buf + pos, c->have - pos, "\r\n\r\n", 4);
        if (!end) break;
        size_t head_len = (size_t)(end - (c->buf + pos));
        long cl = content_length(c->buf + pos, head_len);
        size_t total = head_len + 4 + (cl > 0 ? (size_t)cl : 0);
        if (c->have - pos < total) break;
        const char *req = c->buf + pos, *body = end + 4;
        size_t blen = cl > 0 ? (size_t)cl : 0;
        const char *ans = NOTFOUND;
        size_t alen = sizeof NOTFOUND - 1;
        if (strncmp(req, "GET ", 4) == 0) {
            ans = OK_GET;
            alen = sizeof OK_GET - 1;
        } else if (need_room && !memmem(body, blen, "\"bootstrap_room\"", 16)) {
            ans = BAD;
            alen = sizeof BAD - 1;
        } else {
            int stream = memmem(body, blen, "\"stream\":true", 13) || memmem(body, blen, "\"stream\": true", 14);
            const char *sp = memchr(req, ' ', head_len);
            const char *sp2 = sp ? memchr(sp + 1, ' ', head_len - (size_t)(sp + 1 - req)) : NULL;
            size_t plen = sp2 ? (size_t)(sp2 - sp - 1) : 0;
            for (int i = 0; i < n_answers; i++)
                if (answers[i].stream == stream && strlen(answers[i].path) == plen &&
                    memcmp(answers[i].path, sp + 1, plen) == 0) {
                    ans = answers[i].data;
                    alen = answers[i].len;
                    break;
                }
        }
        if (out_len + alen > sizeof out) {
            write_all(c->fd, out, out_len);
            out_len = 0;
        }
        memcpy(out + out_len, ans, alen);
        out_len += alen;
        pos += total;
    }
    if (out_len) write_all(c->fd, out, out_len);
    memmove(c->buf, c->buf + pos, c->have - pos);
    c->have -= pos;
}

_Noreturn static void serve(int port, const char *answers_path, const char *role) {
    size_t len;
    char *data = read_file(answers_path, &len), *p = data;
    while (p < data + len && n_answers < 16) {
        struct answer *a = &answers[n_answers++];
        int used = 0;
        if (sscanf(p, "%63s %d %zu%n", a->path, &a->stream, &a->len, &used) != 3) die("answers file");
        p += used + 1;
        a->data = p;
        p += a->len;
    }
    int need_room = strcmp(role, "prefill") == 0 || strcmp(role, "decode") == 0;
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(ls, (struct sockaddr *)&addr, sizeof addr) < 0) die("bind");
    if (listen(ls, 1024) < 0) die("listen");
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL}, evs[64];
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    for (;;) {
        int n = epoll_wait(ep, evs, 64, -1);
        for (int i = 0; i < n; i++) {
            struct sconn *c = evs[i].data.ptr;
            if (c == NULL) {
                int fd;
                while ((fd = accept4(ls, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    nodelay(fd);
                    struct sconn *nc = calloc(1, sizeof *nc);
                    nc->fd = fd;
                    struct epoll_event cev = {.events = EPOLLIN, .data.ptr = nc};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &cev);
                }
                continue;
            }
            ssize_t r = read(c->fd, c->buf + c->have, sizeof c->buf - c->have);
            if (r <= 0) {
                if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
                close(c->fd);
                free(c);
                continue;
            }
            c->have += (size_t)r;
            serve_requests(c, need_room);
            if (c->have == sizeof c->buf) {  /* a request larger than the buffer: not ours to serve */
                close(c->fd);
                free(c);
            }
        }
    }
}

/* ------------------------------------------------------------------ load generator */
struct lconn { int fd, client, last; char buf[BUF]; size_t have; long need; };
struct client { double t0; int pending, ok; struct lconn *conns[2]; };

static char **reqs;
static size_t *req_lens;
static int n_reqs;

static int load(long total, int conc, const char *reqs_path, const char *lat_path, int stream, int nports,
                int *ports) {
    size_t len;
    char *data = read_file(reqs_path, &len), *p = data;
    reqs = malloc(sizeof *reqs * 4096);
    req_lens = malloc(sizeof *req_lens * 4096);
    while (p < data + len && n_reqs < 4096) {
        int used = 0;
        if (sscanf(p, "%zu%n", &req_lens[n_reqs], &used) != 1) die("requests file");
        p += used + 1;
        reqs[n_reqs++] = p;
        p += req_lens[n_reqs - 1];
    }
    double *lat = malloc(sizeof *lat * (size_t)total);
    struct client *cl = calloc((size_t)conc, sizeof *cl);
    int ep = epoll_create1(0);
    for (int i = 0; i < conc; i++)
        for (int k = 0; k < nports; k++) {
            int fd = socket(AF_INET, SOCK_STREAM, 0);
            struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(ports[k])};
            addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) die("connect");
            nodelay(fd);
            struct lconn *c = calloc(1, sizeof *c);
            c->fd = fd;
            c->client = i;
            c->last = k == nports - 1;
            cl[i].conns[k] = c;
            struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
            epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
        }
    long sent = 0, done = 0, errors = 0;
    double start = now();
#define FIRE(ci)                                                                 \
    do {                                                                         \
        if (sent < total) {                                                      \
            int r_ = (int)(sent++ % n_reqs);                                     \
            cl[ci].t0 = now();                                                   \
            cl[ci].pending = nports;                                             \
            cl[ci].ok = 1;                                                       \
            for (int k_ = 0; k_ < nports; k_++) {                                \
                cl[ci].conns[k_]->have = 0;                                      \
                cl[ci].conns[k_]->need = -1;                                     \
                write_all(cl[ci].conns[k_]->fd, reqs[r_], req_lens[r_]);         \
            }                                                                    \
        }                                                                        \
    } while (0)
    for (int i = 0; i < conc; i++) FIRE(i);
    struct epoll_event evs[64];
    while (done < total) {
        int n = epoll_wait(ep, evs, 64, 300000);
        if (n <= 0) {
            fprintf(stderr, "load: no progress for 300 s\n");
            return 1;
        }
        for (int i = 0; i < n; i++) {
            struct lconn *c = evs[i].data.ptr;
            ssize_t r = read(c->fd, c->buf + c->have, sizeof c->buf - 1 - c->have);
            if (r <= 0) {
                fprintf(stderr, "load: connection closed by the server\n");
                return 1;
            }
            c->have += (size_t)r;
            c->buf[c->have] = 0;
            if (c->need < 0) {
                char *end = memmem(c->buf, c->have, "\r\n\r\n", 4);
                if (!end) continue;
                long cl_ = content_length(c->buf, (size_t)(end - c->buf));
                c->need = cl_ >= 0 ? (end - c->buf) + 4 + cl_ : 0;
            }
            int complete = c->need ? (long)c->have >= c->need
                                    : c->have >= 7 && memcmp(c->buf + c->have - 7, "\r\n0\r\n\r\n", 7) == 0;
            if (!complete) continue;
            struct client *k = &cl[c->client];
            int good = strncmp(c->buf, "HTTP/1.1 200", 12) == 0;
            if (good && c->last && stream) good = memmem(c->buf, c->have, "data: [DONE]", 12) != NULL;
            k->ok &= good;
            c->have = 0;
            if (--k->pending == 0) {
                lat[done++] = now() - k->t0;
                errors += !k->ok;
                FIRE(c->client);
            }
        }
    }
    double wall = now() - start;
    FILE *f = fopen(lat_path, "w");
    if (!f) die(lat_path);
    for (long i = 0; i < total; i++) fprintf(f, "%.9f\n", lat[i]);
    fclose(f);
    printf("%.1f %ld\n", total / wall, errors);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 5 && strcmp(argv[1], "serve") == 0) serve(atoi(argv[2]), argv[3], argv[4]);
    if ((argc == 8 || argc == 9) && strcmp(argv[1], "load") == 0) {
        int ports[2] = {atoi(argv[7]), argc == 9 ? atoi(argv[8]) : 0};
        return load(atol(argv[2]), atoi(argv[3]), argv[4], argv[5], atoi(argv[6]), argc - 7, ports);
    }
    fprintf(stderr, "usage: harness serve PORT ANSWERS ROLE | harness load N CONC REQUESTS LATENCIES STREAM PORT [PORT]\n");
    return 2;
}

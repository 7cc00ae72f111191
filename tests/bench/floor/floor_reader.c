/* floor_reader: the reading half of the floor probe (tests/bench/floor/README.md).
 *
 * Opens N loopback connections to floor_sender (optionally spread over
 * source addresses 127.0.0.2 …), writes one ready byte on each, then reads
 * them all on one thread with level-triggered epoll: one large read() per
 * readable connection and wake-up, websocket frames parsed in place in the
 * read buffer (a partial frame is carried over per connection; nothing is
 * allocated per frame). For each publish frame it checks the sequence
 * number (every connection must get every trigger, once, in order) and
 * records the latency now - ts (CLOCK_MONOTONIC, the same clock the sender
 * stamped the frame with when it built it) into the step's histogram
 * (log-linear buckets, 64 per power of two: ≤ 1.6 % relative error; the
 * upper end of a bucket is reported, like HdrHistogram's value_at_quantile).
 *
 * Once every connection has the step's floor_step_end frame it writes one
 * acknowledgement byte on its first connection and reads the sender's
 * figures (floor_step_stats) for the step; after the last step it closes
 * every connection and prints one JSON object on stdout (tests/bench/README.md
 * "floor.json"); a table goes to stderr.
 *
 * Exit status 0 when every connection got every frame of every step exactly
 * once and in order; 1 otherwise, or on any failure (message on stderr). */
#include "floor_common.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define HIST_BUCKETS 3776
#define READ_BUF (1u << 20)

struct hist {
  uint64_t counts[HIST_BUCKETS];
  uint64_t n, max;
};

static unsigned hist_index(uint64_t v) {
  if (v < 128) return (unsigned)v;
  unsigned msb = 63u - (unsigned)__builtin_clzll(v);
  unsigned shift = msb - 6;
  return shift * 64 + (unsigned)(v >> shift);
}

/* The largest value of bucket idx. */
static uint64_t hist_upper(unsigned idx) {
  if (idx < 128) return idx;
  unsigned shift = idx / 64 - 1;
  uint64_t sub = idx - shift * 64;
  return ((sub + 1) << shift) - 1;
}

static void hist_add(struct hist *h, uint64_t v) {
  h->counts[hist_index(v)]++;
  h->n++;
  if (v > h->max) h->max = v;
}

static uint64_t hist_quantile(const struct hist *h, double q) {
  uint64_t rank = (uint64_t)(q * (double)h->n + 0.999999999);
  if (rank < 1) rank = 1;
  uint64_t seen = 0;
  for (unsigned i = 0; i < HIST_BUCKETS; i++) {
    seen += h->counts[i];
    if (seen >= rank) {
      uint64_t v = hist_upper(i);
      return v < h->max ? v : h->max;
    }
  }
  return h->max;
}

struct conn {
  int fd;
  int step;           /* steps whose end this connection has seen */
  uint64_t next_seq;  /* the sequence number it must get next */
  uint64_t got;       /* publish frames of the current step */
  size_t carry_len;   /* bytes of a partial frame kept in carry */
  char *carry;
};

struct step {
  int ended;                 /* floor_step_end seen on some connection */
  long ends;                 /* connections that saw it */
  uint64_t first_seq, triggers, start_ns, last_trigger_ns, send_ns, rate_milli, duration_ms, payload_bytes, last;
  uint64_t received, lost, duplicated, out_of_order, complete_conns, last_delivery_ns;
  uint64_t frame_bytes;
  struct hist lat;
  /* the reader's own CPU and wall time over the step */
  uint64_t r_cpu0, r_wall0, r_cpu, r_wall;
  /* the sender's figures */
  int have_stats;
  uint64_t cpu_us, wall_us, sends, full;
};

static struct conn *conns;
static long nconns;
static struct step steps[FLOOR_MAX_STEPS];
static int nsteps;       /* steps complete (every connection saw the end) */
static int awaiting = -1; /* step whose sender figures are awaited */
static int done;
static size_t max_frame = 4096;
static char *buf;

static const char PUBLISH_HEAD[] = "{\"type\":\"publish\",\"data\":{\"seq\":";

/* Parses decimal digits at *p (advancing it); 0 when there are none. */
static int digits(const char **p, const char *end, uint64_t *out) {
  const char *s = *p;
  uint64_t v = 0;
  while (s < end && *s >= '0' && *s <= '9') v = v * 10 + (uint64_t)(*s++ - '0');
  if (s == *p) return 0;
  *p = s;
  *out = v;
  return 1;
}

static int expect(const char **p, const char *end, const char *lit) {
  size_t n = strlen(lit);
  if ((size_t)(end - *p) < n || memcmp(*p, lit, n) != 0) return 0;
  *p += n;
  return 1;
}

static void send_byte(long i, char b) {
  for (;;) {
    ssize_t n = write(conns[i].fd, &b, 1);
    if (n == 1) return;
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) die_errno("write to connection %ld", i);
    die("write to connection %ld: nothing written", i);
  }
}

static void publish_frame(long i, const char *p, size_t len, size_t frame_len, uint64_t now) {
  struct conn *c = &conns[i];
  const char *end = p + len, *s = p + sizeof PUBLISH_HEAD - 1;
  uint64_t seq, ts, phase;
  if (!digits(&s, end, &seq) || !expect(&s, end, ",\"ts\":") || !digits(&s, end, &ts) ||
      !expect(&s, end, ",\"p\":") || !digits(&s, end, &phase))
    die("connection %ld: malformed publish frame: %.*s", i, (int)(len < 200 ? len : 200), p);
  if (phase != (uint64_t)c->step || c->step >= FLOOR_MAX_STEPS)
    die("connection %ld: a frame of step %llu during step %d", i, (unsigned long long)phase, c->step);
  struct step *st = &steps[c->step];
  if (seq != c->next_seq) st->out_of_order++;
  if (seq >= c->next_seq) c->next_seq = seq + 1;
  c->got++;
  st->received++;
  st->frame_bytes = frame_len;
  st->last_delivery_ns = now;
  hist_add(&st->lat, now > ts ? now - ts : 0);
}

static void step_end_frame(long i, const char *p, size_t len, uint64_t now) {
  struct conn *c = &conns[i];
  uint64_t v[10];
  static const char *keys[10] = {"p", "first_seq", "triggers", "start_ns", "last_trigger_ns",
                                 "send_ns", "rate_milli", "duration_ms", "payload_bytes", "last"};
  for (int k = 0; k < 10; k++)
    if (!json_u64(p, len, keys[k], &v[k])) die("connection %ld: floor_step_end without %s: %.*s", i, keys[k], (int)len, p);
  if (v[0] != (uint64_t)c->step || c->step >= FLOOR_MAX_STEPS)
    die("connection %ld: end of step %llu during step %d", i, (unsigned long long)v[0], c->step);
  struct step *st = &steps[c->step];
  if (!st->ended) {
    st->ended = 1;
    st->first_seq = v[1];
    st->triggers = v[2];
    st->start_ns = v[3];
    st->last_trigger_ns = v[4];
    st->send_ns = v[5];
    st->rate_milli = v[6];
    st->duration_ms = v[7];
    st->payload_bytes = v[8];
    st->last = v[9];
  } else if (st->first_seq != v[1] || st->triggers != v[2]) {
    die("connection %ld: step %d's end differs between connections", i, c->step);
  }
  /* Every trigger of the step, once: lost and duplicated frames of this
   * connection (an out-of-order frame was counted when it arrived). */
  if (c->got < st->triggers) st->lost += st->triggers - c->got;
  if (c->got > st->triggers) st->duplicated += c->got - st->triggers;
  if (c->next_seq != st->first_seq + st->triggers) st->out_of_order++;
  if (c->got == st->triggers && c->next_seq == st->first_seq + st->triggers) st->complete_conns++;
  c->next_seq = st->first_seq + st->triggers;
  c->got = 0;
  c->step++;
  st->ends++;
  if (st->ends == nconns) {
    /* Every connection has the whole step: acknowledge it on the first
     * connection, and wait for the sender's figures. */
    uint64_t cpu = cpu_us();
    st->r_cpu = cpu - st->r_cpu0;
    st->r_wall = now - st->r_wall0;
    /* The next step starts as soon as the sender has the acknowledgement
     * (its frames may arrive on other connections before its figures). */
    if (c->step < FLOOR_MAX_STEPS) {
      steps[c->step].r_cpu0 = cpu;
      steps[c->step].r_wall0 = now;
    }
    awaiting = nsteps;
    nsteps++;
    send_byte(0, FLOOR_ACK);
  }
}

static void stats_frame(long i, const char *p, size_t len) {
  uint64_t v[6];
  static const char *keys[6] = {"p", "cpu_us", "wall_us", "sends", "full", "last"};
  for (int k = 0; k < 6; k++)
    if (!json_u64(p, len, keys[k], &v[k])) die("connection %ld: floor_step_stats without %s", i, keys[k]);
  if (awaiting < 0 || v[0] != (uint64_t)awaiting) die("connection %ld: unexpected figures of step %llu", i, (unsigned long long)v[0]);
  struct step *st = &steps[awaiting];
  st->have_stats = 1;
  st->cpu_us = v[1];
  st->wall_us = v[2];
  st->sends = v[3];
  st->full = v[4];
  uint64_t deliveries = st->triggers * (uint64_t)nconns;
  fprintf(stderr,
          "floor_reader: step %d: %.6g/s, %llu triggers, %llu/%llu deliveries, p99 %.2f ms, sender %.2f us per "
          "delivery, reader CPU %.0f %%\n",
          awaiting, st->rate_milli / 1000.0, (unsigned long long)st->triggers, (unsigned long long)st->received,
          (unsigned long long)deliveries, hist_quantile(&st->lat, 0.99) / 1e6,
          deliveries ? (double)st->cpu_us / (double)deliveries : 0.0,
          st->r_wall ? 100.0 * (double)st->r_cpu * 1000.0 / (double)st->r_wall : 0.0);
  if (v[5]) done = 1;
  else if (awaiting + 1 >= FLOOR_MAX_STEPS) die("more than %d steps", FLOOR_MAX_STEPS);
  awaiting = -1;
}

/* One read() of connection i; parses every whole frame. Returns 1 when it
 * read something. */
static int read_conn(long i) {
  struct conn *c = &conns[i];
  if (c->carry_len) memcpy(buf, c->carry, c->carry_len);
  ssize_t n = read(c->fd, buf + c->carry_len, READ_BUF - c->carry_len);
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return 0;
    die_errno("read from connection %ld", i);
  }
  if (n == 0) die("connection %ld: closed by the sender (step %d)", i, c->step);
  uint64_t now = mono_ns();
  size_t have = c->carry_len + (size_t)n, at = 0;
  while (have - at >= 2) {
    const unsigned char *h = (const unsigned char *)buf + at;
    if (h[0] != 0x81) die("connection %ld: not a final text frame (first byte 0x%02x)", i, h[0]);
    if (h[1] & 0x80) die("connection %ld: a masked frame from the server", i);
    size_t len = h[1] & 0x7f, head = 2;
    if (len == 127) die("connection %ld: a frame over 64 KiB", i);
    if (len == 126) {
      if (have - at < 4) break;
      len = ((size_t)h[2] << 8) | h[3];
      head = 4;
    }
    if (head + len > max_frame) die("connection %ld: a %zu-byte frame, over --max-frame %zu", i, head + len, max_frame);
    if (have - at < head + len) break;
    const char *p = buf + at + head;
    if (len >= sizeof PUBLISH_HEAD - 1 && memcmp(p, PUBLISH_HEAD, sizeof PUBLISH_HEAD - 1) == 0)
      publish_frame(i, p, len, head + len, now);
    else if (len >= strlen(FLOOR_STEP_END) && memcmp(p, FLOOR_STEP_END, strlen(FLOOR_STEP_END)) == 0)
      step_end_frame(i, p, len, now);
    else if (len >= strlen(FLOOR_STEP_STATS) && memcmp(p, FLOOR_STEP_STATS, strlen(FLOOR_STEP_STATS)) == 0)
      stats_frame(i, p, len);
    else
      die("connection %ld: unexpected frame: %.*s", i, (int)(len < 200 ? len : 200), p);
    at += head + len;
  }
  c->carry_len = have - at;
  if (c->carry_len) memcpy(c->carry, buf + at, c->carry_len);
  return 1;
}

static void usage(void) {
  fputs("usage: floor_reader --port P [--host 127.0.0.1] [--connections N] [--source-addrs K]\n"
        "                    [--connect-timeout S] [--idle-timeout S] [--max-frame BYTES] [--pace-us US]\n"
        "  --connections N      connections to open (default 5000; the sender's --connections)\n"
        "  --source-addrs K     bind connection i to 127.0.0.(2 + i mod K) (default 0: the kernel's\n"
        "                       choice; more than ~28 000 connections need K > 1)\n"
        "  --connect-timeout S  seconds to wait for the sender to listen (default 10)\n"
        "  --idle-timeout S     give up after this long without a byte (default 60)\n"
        "  --max-frame BYTES    largest websocket frame accepted (default 4096)\n"
        "  --pace-us US         look at the sockets at most every US microseconds (default 500,\n"
        "                       as the bench's reader; 0: at every wake-up)\n",
        stderr);
}

static double ms(uint64_t ns) { return (double)ns / 1e6; }

static void print_json(long source_addrs, uint64_t started_unix) {
  uint64_t lost = 0, dup = 0, ooo = 0;
  printf("{\"tool\":\"high-templar-floor\",\"connections\":%ld,\"source_addrs\":%ld,\"started_unix\":%llu,"
         "\"finished_unix\":%llu,\"steps\":[",
         nconns, source_addrs, (unsigned long long)started_unix, (unsigned long long)time(NULL));
  for (int s = 0; s < nsteps; s++) {
    struct step *st = &steps[s];
    uint64_t expected = st->triggers * (uint64_t)nconns;
    double seconds = st->send_ns / 1e9;
    double span = st->last_delivery_ns > st->start_ns ? (st->last_delivery_ns - st->start_ns) / 1e9 : 0;
    double drain = st->last_delivery_ns > st->last_trigger_ns ? (st->last_delivery_ns - st->last_trigger_ns) / 1e9 : 0;
    lost += st->lost;
    dup += st->duplicated;
    ooo += st->out_of_order;
    printf("%s{\"name\":\"%.6g/s\",\"target_rate\":%.6g,\"payload_bytes\":%llu,\"frame_bytes\":%llu,"
           "\"seconds\":%.6f,\"triggers\":%llu,\"trigger_rate\":%.3f,\"expected\":%llu,\"received\":%llu,"
           "\"lost\":%llu,\"duplicated\":%llu,\"out_of_order\":%llu,\"complete_connections\":%llu,"
           "\"deliveries_per_second\":%.1f,\"drain_seconds\":%.6f,",
           s ? "," : "", st->rate_milli / 1000.0, st->rate_milli / 1000.0, (unsigned long long)st->payload_bytes,
           (unsigned long long)st->frame_bytes, seconds, (unsigned long long)st->triggers,
           seconds > 0 ? st->triggers / seconds : 0.0, (unsigned long long)expected,
           (unsigned long long)st->received, (unsigned long long)st->lost, (unsigned long long)st->duplicated,
           (unsigned long long)st->out_of_order, (unsigned long long)st->complete_conns,
           span > 0 ? st->received / span : 0.0, drain);
    if (st->lat.n)
      printf("\"latency_ms\":{\"count\":%llu,\"p50\":%.3f,\"p90\":%.3f,\"p99\":%.3f,\"max\":%.3f},",
             (unsigned long long)st->lat.n, ms(hist_quantile(&st->lat, 0.5)), ms(hist_quantile(&st->lat, 0.9)),
             ms(hist_quantile(&st->lat, 0.99)), ms(st->lat.max));
    else
      printf("\"latency_ms\":{\"count\":0,\"p50\":null,\"p90\":null,\"p99\":null,\"max\":null},");
    printf("\"sender_cpu_seconds\":%.6f,\"sender_cpu_percent\":%.2f,\"sender_cpu_us_per_trigger\":%.3f,"
           "\"sender_cpu_us_per_delivery\":%.4f,\"sender_sends\":%llu,\"sender_sockets_full\":%llu,"
           "\"reader_cpu_percent\":%.2f}",
           st->cpu_us / 1e6, st->wall_us ? 100.0 * st->cpu_us / st->wall_us : 0.0,
           st->triggers ? (double)st->cpu_us / st->triggers : 0.0, expected ? (double)st->cpu_us / expected : 0.0,
           (unsigned long long)st->sends, (unsigned long long)st->full,
           st->r_wall ? 100.0 * st->r_cpu * 1000.0 / st->r_wall : 0.0);
  }
  printf("],\"summary\":{\"steps\":[");
  for (int s = 0; s < nsteps; s++) {
    struct step *st = &steps[s];
    uint64_t expected = st->triggers * (uint64_t)nconns;
    double span = st->last_delivery_ns > st->start_ns ? (st->last_delivery_ns - st->start_ns) / 1e9 : 0;
    printf("%s{\"rate\":%.6g,\"deliveries_per_second\":%.0f,\"p99_ms\":%.2f,\"cpu_us_per_delivery\":%.3f}", s ? "," : "",
           st->rate_milli / 1000.0, span > 0 ? st->received / span : 0.0,
           st->lat.n ? ms(hist_quantile(&st->lat, 0.99)) : 0.0, expected ? (double)st->cpu_us / expected : 0.0);
  }
  int ok = lost == 0 && dup == 0 && ooo == 0;
  printf("]},\"problems\":[");
  int first = 1;
  for (int s = 0; s < nsteps; s++) {
    struct step *st = &steps[s];
    if (st->lost || st->duplicated || st->out_of_order) {
      printf("%s\"step %.6g/s: %llu lost, %llu duplicated, %llu out of order; %llu/%ld connections got every frame\"",
             first ? "" : ",", st->rate_milli / 1000.0, (unsigned long long)st->lost,
             (unsigned long long)st->duplicated, (unsigned long long)st->out_of_order,
             (unsigned long long)st->complete_conns, nconns);
      first = 0;
    }
  }
  printf("],\"ok\":%s}\n", ok ? "true" : "false");
  if (fflush(stdout) != 0 || ferror(stdout)) die_errno("writing the JSON result");

  fprintf(stderr, "\nfloor probe: %ld connections\n", nconns);
  fprintf(stderr, "  %-10s %9s %11s %10s %8s %8s %8s %8s %10s %9s %9s %6s %5s\n", "step", "triggers", "deliveries",
          "deliv/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "us/deliv", "snd cpu%", "rdr cpu%", "lost", "dup");
  for (int s = 0; s < nsteps; s++) {
    struct step *st = &steps[s];
    uint64_t expected = st->triggers * (uint64_t)nconns;
    double span = st->last_delivery_ns > st->start_ns ? (st->last_delivery_ns - st->start_ns) / 1e9 : 0;
    fprintf(stderr, "  %-10.6g %9llu %11llu %10.0f %8.2f %8.2f %8.2f %8.2f %10.3f %9.0f %9.0f %6llu %5llu\n",
            st->rate_milli / 1000.0, (unsigned long long)st->triggers, (unsigned long long)st->received,
            span > 0 ? st->received / span : 0.0, ms(hist_quantile(&st->lat, 0.5)), ms(hist_quantile(&st->lat, 0.9)),
            ms(hist_quantile(&st->lat, 0.99)), ms(st->lat.max), expected ? (double)st->cpu_us / expected : 0.0,
            st->wall_us ? 100.0 * st->cpu_us / st->wall_us : 0.0,
            st->r_wall ? 100.0 * st->r_cpu * 1000.0 / st->r_wall : 0.0, (unsigned long long)st->lost,
            (unsigned long long)st->duplicated);
  }
  fprintf(stderr, "correctness: %s\n", ok ? "OK (every connection got every frame once, in order)" : "FAILED");
}

int main(int argc, char **argv) {
  floor_prog = "floor_reader";
  const char *host = "127.0.0.1";
  long port = -1, source_addrs = 0, pace_us = 500;
  nconns = 5000;
  double connect_timeout = 10, idle_timeout = 60;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (!strcmp(a, "--port")) port = parse_long(a, flag_value(argc, argv, &i), 1, 65535);
    else if (!strcmp(a, "--host")) host = flag_value(argc, argv, &i);
    else if (!strcmp(a, "--connections")) nconns = parse_long(a, flag_value(argc, argv, &i), 1, 1000000);
    else if (!strcmp(a, "--source-addrs")) source_addrs = parse_long(a, flag_value(argc, argv, &i), 0, 250);
    else if (!strcmp(a, "--connect-timeout"))
      connect_timeout = parse_double(a, flag_value(argc, argv, &i), 0.1, 86400);
    else if (!strcmp(a, "--idle-timeout")) idle_timeout = parse_double(a, flag_value(argc, argv, &i), 0.1, 86400);
    else if (!strcmp(a, "--pace-us")) pace_us = parse_long(a, flag_value(argc, argv, &i), 0, 1000000);
    else if (!strcmp(a, "--max-frame"))
      max_frame = (size_t)parse_long(a, flag_value(argc, argv, &i), 16, FLOOR_MAX_PAYLOAD + 4);
    else if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
      usage();
      return 0;
    } else {
      usage();
      die("unknown argument %s", a);
    }
  }
  if (port < 0) {
    usage();
    die("--port is required");
  }
  struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
  if (inet_pton(AF_INET, host, &to.sin_addr) != 1) die("--host %s: not an IPv4 address", host);
  if ((ntohl(to.sin_addr.s_addr) >> 24) != 127) die("--host %s: the floor runs on loopback (127.0.0.0/8) only", host);

  uint64_t started_unix = (uint64_t)time(NULL);
  conns = calloc((size_t)nconns, sizeof *conns);
  char *carry = malloc((size_t)nconns * max_frame);
  buf = malloc(READ_BUF);
  if (conns == NULL || carry == NULL || buf == NULL) die("out of memory (%ld connections)", nconns);
  int ep = epoll_create1(EPOLL_CLOEXEC);
  if (ep < 0) die_errno("epoll_create1");

  uint64_t connect_deadline = mono_ns() + (uint64_t)(connect_timeout * 1e9);
  for (long i = 0; i < nconns; i++) {
    int fd;
    for (;;) {
      fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
      if (fd < 0) die_errno("socket (connection %ld; open-file limit?)", i);
      if (source_addrs > 0) {
        struct sockaddr_in from = {.sin_family = AF_INET, .sin_port = 0};
        from.sin_addr.s_addr = htonl((127u << 24) | (uint32_t)(2 + i % source_addrs));
        if (bind(fd, (struct sockaddr *)&from, sizeof from) != 0) die_errno("bind 127.0.0.%ld", 2 + i % source_addrs);
      }
      if (connect(fd, (struct sockaddr *)&to, sizeof to) == 0) break;
      /* Only the first connection waits for the sender to listen. */
      if (i == 0 && errno == ECONNREFUSED && mono_ns() < connect_deadline) {
        if (close(fd) != 0) die_errno("close");
        struct timespec pause = {.tv_sec = 0, .tv_nsec = 20 * 1000 * 1000};
        nanosleep(&pause, NULL);
        continue;
      }
      die_errno("connect %s:%ld (connection %ld)", host, port, i);
    }
    int one = 1;
    if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) != 0) die_errno("setsockopt(TCP_NODELAY)");
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) != 0) die_errno("setting connection %ld non-blocking", i);
    conns[i].fd = fd;
    conns[i].carry = carry + (size_t)i * max_frame;
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)i};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) != 0) die_errno("epoll_ctl(ADD) connection %ld", i);
  }
  fprintf(stderr, "floor_reader: %ld connections open\n", nconns);
  steps[0].r_cpu0 = cpu_us();
  steps[0].r_wall0 = mono_ns();
  for (long i = 0; i < nconns; i++) send_byte(i, FLOOR_READY);

  static struct epoll_event evs[1024];
  uint64_t last_byte = mono_ns();
  while (!done) {
    int n = epoll_wait(ep, evs, 1024, 1000);
    if (n < 0) {
      if (errno == EINTR) continue;
      die_errno("epoll_wait");
    }
    uint64_t woke = mono_ns();
    int got = 0;
    for (int k = 0; k < n && !done; k++) got |= read_conn((long)evs[k].data.u64);
    uint64_t now = mono_ns();
    if (got) last_byte = now;
    else if (now - last_byte > (uint64_t)(idle_timeout * 1e9))
      die("nothing read for %.1f s (%d steps complete)", idle_timeout, nsteps);
    /* Paced like the bench's reader (tests/bench/src/reader.rs): a reader
     * blocked in epoll_wait makes every write of the sender pay a
     * cross-core wake-up (on loopback the receive path runs in the
     * sender's system call), which a remote client never costs it. */
    if (n < 1024 && now - woke < (uint64_t)pace_us * 1000) {
      uint64_t left = (uint64_t)pace_us * 1000 - (now - woke);
      struct timespec pause = {(time_t)(left / 1000000000u), (long)(left % 1000000000u)};
      nanosleep(&pause, NULL);
    }
  }
  for (long i = 0; i < nconns; i++)
    if (close(conns[i].fd) != 0) die_errno("close connection %ld", i);
  print_json(source_addrs, started_unix);
  uint64_t bad = 0;
  for (int s = 0; s < nsteps; s++) bad += steps[s].lost + steps[s].duplicated + steps[s].out_of_order;
  return bad ? 1 : 0;
}

/* floor_sender: the sending half of the floor probe (tests/bench/floor/README.md).
 *
 * Listens on loopback, accepts N connections (from floor_reader), then for
 * each step publishes R triggers per second for S seconds. Each trigger is
 * ONE server-to-client websocket text frame, built once, the size and shape
 * of the gateway's publish frame for the bench's data:
 *   {"type":"publish","data":{"seq":S,"ts":T,"p":P,"pad":"xx…"},"requestId":0}
 * (data padded to --payload-bytes, T = CLOCK_MONOTONIC ns at build time),
 * written to every connection. Every connection receives the same byte
 * stream, so it lives once, in one buffer, and each connection keeps only
 * its offset into it: one non-blocking send() per connection and wake-up
 * writes everything not yet written to it; a connection whose socket is
 * full waits for EPOLLOUT and then writes all it has queued in one send().
 * One thread, level-triggered epoll, no allocation per frame.
 *
 * After a step's last trigger it writes a floor_step_end frame to every
 * connection, waits for the reader's acknowledgement (one byte, written
 * once every connection had the step's end), and answers it with a
 * floor_step_stats frame: its CPU time (getrusage: user + system) and wall
 * time from the step's start to the acknowledgement, so the reader can
 * report the sender's CPU per delivery. The next step starts after that.
 *
 * Exit status 0 when every step ran and the reader closed every connection
 * at the end; 1 on any failure (with a message on stderr). */
#include "floor_common.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

struct conn {
  int fd;
  size_t off;     /* bytes of the stream written to this connection */
  int armed;      /* EPOLLOUT requested */
  int ready;      /* its ready byte arrived */
  int closed;     /* the reader closed it (only allowed at the end) */
};

static struct conn *conns;
static long nconns;
static int accepted;
static int ep;
static int lfd;

/* The byte stream every connection gets. */
static char *stream;
static size_t stream_len, stream_cap;

/* Counters of the current step. */
static uint64_t step_sends, step_full;
static long acks, ack_conn = -1;
static long ready_count, closed_count;
static int finishing;

static void usage(void) {
  fputs("usage: floor_sender --port P [--host 127.0.0.1] [--connections N] [--rates R1,R2,...]\n"
        "                    [--duration S] [--payload-bytes B] [--connect-timeout S]\n"
        "                    [--drain-timeout S] [--fault-skip]\n"
        "  --connections N      connections to accept (default 5000)\n"
        "  --rates LIST         triggers per second of each step (default 10,20,50,100,200)\n"
        "  --duration S         seconds of triggers per step (default 10)\n"
        "  --payload-bytes B    size of each frame's data object (default 128, as the bench's)\n"
        "  --connect-timeout S  seconds for all connections to open and be ready (default 60)\n"
        "  --drain-timeout S    seconds after a step's end for the reader's acknowledgement (default 30)\n"
        "  --fault-skip         self-test of the reader's loss check: the first connection\n"
        "                       does not get the first trigger\n",
        stderr);
}

static void reserve(size_t more) {
  if (stream_len + more <= stream_cap) return;
  size_t cap = stream_cap ? stream_cap : 1 << 16;
  while (cap < stream_len + more) cap *= 2;
  char *p = realloc(stream, cap);
  if (p == NULL) die("out of memory (stream buffer of %zu bytes)", cap);
  stream = p;
  stream_cap = cap;
}

/* Appends one unmasked FIN text frame with this payload to the stream;
 * returns its length on the wire. */
static size_t append_frame(const char *payload, size_t len) {
  if (len > FLOOR_MAX_PAYLOAD) die("frame payload of %zu bytes is too large", len);
  reserve(len + 4);
  char *p = stream + stream_len;
  size_t head;
  p[0] = (char)0x81; /* FIN, text */
  if (len <= 125) {
    p[1] = (char)len;
    head = 2;
  } else {
    p[1] = 126;
    p[2] = (char)(len >> 8);
    p[3] = (char)(len & 0xff);
    head = 4;
  }
  memcpy(p + head, payload, len);
  stream_len += head + len;
  return head + len;
}

static void set_events(long i, uint32_t events) {
  struct epoll_event ev = {.events = events, .data.u64 = (uint64_t)i};
  if (epoll_ctl(ep, EPOLL_CTL_MOD, conns[i].fd, &ev) != 0) die_errno("epoll_ctl(MOD) connection %ld", i);
}

/* One send() of everything queued for connection i. */
static void flush_conn(long i) {
  struct conn *c = &conns[i];
  if (c->off < stream_len) {
    ssize_t n = send(c->fd, stream + c->off, stream_len - c->off, MSG_NOSIGNAL | MSG_DONTWAIT);
    step_sends++;
    if (n < 0) {
      if (errno != EAGAIN && errno != EWOULDBLOCK) die_errno("send to connection %ld", i);
      n = 0;
    }
    c->off += (size_t)n;
  }
  int want = c->off < stream_len;
  if (want && !c->armed) {
    step_full++;
    set_events(i, EPOLLIN | EPOLLOUT);
    c->armed = 1;
  } else if (!want && c->armed) {
    set_events(i, EPOLLIN);
    c->armed = 0;
  }
}

/* Every connection not waiting for EPOLLOUT writes what it has queued. */
static void flush_all(void) {
  for (long i = 0; i < nconns; i++)
    if (!conns[i].armed && !conns[i].closed) flush_conn(i);
}

static long queued_conns(void) {
  long n = 0;
  for (long i = 0; i < nconns; i++) n += conns[i].off < stream_len;
  return n;
}

static void accept_all(void) {
  for (;;) {
    int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK) return;
      if (errno == EINTR || errno == ECONNABORTED) continue;
      die_errno("accept");
    }
    if (accepted >= nconns) die("more than the %ld connections expected", nconns);
    int one = 1;
    if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) != 0) die_errno("setsockopt(TCP_NODELAY)");
    long i = accepted++;
    conns[i].fd = fd;
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)i};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) != 0) die_errno("epoll_ctl(ADD) connection %ld", i);
  }
}

/* Reads what the reader wrote on connection i: ready bytes, acks, EOF. */
static void read_conn(long i) {
  char buf[64];
  ssize_t n = read(conns[i].fd, buf, sizeof buf);
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return;
    if (errno == ECONNRESET && finishing) n = 0;
    else die_errno("read from connection %ld", i);
  }
  if (n == 0) {
    if (!finishing) die("the reader closed connection %ld before the end", i);
    if (epoll_ctl(ep, EPOLL_CTL_DEL, conns[i].fd, NULL) != 0) die_errno("epoll_ctl(DEL)");
    if (close(conns[i].fd) != 0) die_errno("close");
    conns[i].closed = 1;
    closed_count++;
    return;
  }
  for (ssize_t k = 0; k < n; k++) {
    if (buf[k] == FLOOR_READY) {
      if (conns[i].ready) die("connection %ld sent two ready bytes", i);
      conns[i].ready = 1;
      ready_count++;
    } else if (buf[k] == FLOOR_ACK) {
      acks++;
      ack_conn = i;
    } else {
      die("unexpected byte 0x%02x from connection %ld", (unsigned char)buf[k], i);
    }
  }
}

/* Waits up to timeout_ms for events and handles them. */
static void poll_once(int timeout_ms) {
  static struct epoll_event evs[1024];
  int n = epoll_wait(ep, evs, 1024, timeout_ms);
  if (n < 0) {
    if (errno == EINTR) return;
    die_errno("epoll_wait");
  }
  for (int k = 0; k < n; k++) {
    uint64_t id = evs[k].data.u64;
    if (id == UINT64_MAX) {
      accept_all();
      continue;
    }
    long i = (long)id;
    if (conns[i].closed) continue;
    if (evs[k].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) read_conn(i);
    if (conns[i].closed) continue;
    if (evs[k].events & EPOLLOUT) flush_conn(i);
  }
}

static int ms_until(uint64_t deadline, uint64_t now) {
  if (deadline <= now) return 0;
  uint64_t ms = (deadline - now + 999999) / 1000000;
  return ms > 1000 ? 1000 : (int)ms;
}

int main(int argc, char **argv) {
  floor_prog = "floor_sender";
  const char *host = "127.0.0.1";
  long port = -1;
  nconns = 5000;
  double rates[FLOOR_MAX_STEPS] = {10, 20, 50, 100, 200};
  int nsteps = 5;
  double duration = 10, connect_timeout = 60, drain_timeout = 30;
  long payload_bytes = 128;
  int fault_skip = 0;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (!strcmp(a, "--port")) port = parse_long(a, flag_value(argc, argv, &i), 1, 65535);
    else if (!strcmp(a, "--host")) host = flag_value(argc, argv, &i);
    else if (!strcmp(a, "--connections")) nconns = parse_long(a, flag_value(argc, argv, &i), 1, 1000000);
    else if (!strcmp(a, "--duration")) duration = parse_double(a, flag_value(argc, argv, &i), 0.001, 86400);
    else if (!strcmp(a, "--payload-bytes"))
      payload_bytes = parse_long(a, flag_value(argc, argv, &i), 0, FLOOR_MAX_PAYLOAD - 200);
    else if (!strcmp(a, "--connect-timeout"))
      connect_timeout = parse_double(a, flag_value(argc, argv, &i), 0.1, 86400);
    else if (!strcmp(a, "--drain-timeout")) drain_timeout = parse_double(a, flag_value(argc, argv, &i), 0.1, 86400);
    else if (!strcmp(a, "--fault-skip")) fault_skip = 1;
    else if (!strcmp(a, "--rates")) {
      char *list = strdup(flag_value(argc, argv, &i));
      if (list == NULL) die("out of memory");
      nsteps = 0;
      for (char *save = NULL, *tok = strtok_r(list, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        if (nsteps >= FLOOR_MAX_STEPS) die("--rates: at most %d steps", FLOOR_MAX_STEPS);
        rates[nsteps++] = parse_double("--rates", tok, 0.001, 1e7);
      }
      free(list);
      if (nsteps == 0) die("--rates: no rate given");
    } else if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
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

  struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
  if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) die("--host %s: not an IPv4 address", host);
  if ((ntohl(addr.sin_addr.s_addr) >> 24) != 127) die("--host %s: the floor runs on loopback (127.0.0.0/8) only", host);

  conns = calloc((size_t)nconns, sizeof *conns);
  if (conns == NULL) die("out of memory (%ld connections)", nconns);
  for (long i = 0; i < nconns; i++) conns[i].fd = -1;

  lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (lfd < 0) die_errno("socket");
  int one = 1;
  if (setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0) die_errno("setsockopt(SO_REUSEADDR)");
  if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) != 0) die_errno("bind %s:%ld", host, port);
  if (listen(lfd, 4096) != 0) die_errno("listen");
  ep = epoll_create1(EPOLL_CLOEXEC);
  if (ep < 0) die_errno("epoll_create1");
  struct epoll_event lev = {.events = EPOLLIN, .data.u64 = UINT64_MAX};
  if (epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &lev) != 0) die_errno("epoll_ctl(ADD) listener");
  fprintf(stderr, "floor_sender: listening on %s:%ld for %ld connections\n", host, port, nconns);

  uint64_t deadline = mono_ns() + (uint64_t)(connect_timeout * 1e9);
  while (ready_count < nconns) {
    uint64_t now = mono_ns();
    if (now >= deadline)
      die("%d/%ld connections accepted, %ld ready after %.1f s", accepted, nconns, ready_count, connect_timeout);
    poll_once(ms_until(deadline, now));
  }
  if (close(lfd) != 0) die_errno("close(listener)");
  fprintf(stderr, "floor_sender: %ld connections ready\n", nconns);

  char payload[FLOOR_MAX_PAYLOAD + 256];
  char pad[FLOOR_MAX_PAYLOAD];
  memset(pad, 'x', sizeof pad);
  uint64_t seq = 0;
  for (int s = 0; s < nsteps; s++) {
    double rate = rates[s];
    uint64_t cpu0 = cpu_us();
    uint64_t start = mono_ns();
    uint64_t end = start + (uint64_t)(duration * 1e9);
    uint64_t first_seq = seq, sent = 0, last_trigger = start;
    step_sends = step_full = 0;
    acks = 0;
    /* Publishing: trigger i is due at start + i / rate, while before the
     * end (the bench's schedule); triggers that are due together (the
     * sender was behind) go out in the same round. */
    for (;;) {
      uint64_t now = mono_ns();
      if (now >= end) break;
      int built = 0;
      for (;;) {
        uint64_t due = start + (uint64_t)((double)sent * 1e9 / rate);
        if (due > now || due >= end) break;
        uint64_t ts = mono_ns();
        int head = snprintf(payload, sizeof payload, "{\"type\":\"publish\",\"data\":{\"seq\":%llu,\"ts\":%llu,\"p\":%d",
                            (unsigned long long)seq, (unsigned long long)ts, s);
        if (head < 0 || (size_t)head >= sizeof payload) die("snprintf");
        long data_head = head - (long)strlen("{\"type\":\"publish\",\"data\":");
        long pad_len = payload_bytes - (data_head + (long)strlen(",\"pad\":\"\"}"));
        size_t len = (size_t)head;
        if (pad_len > 0) {
          memcpy(payload + len, ",\"pad\":\"", 8);
          len += 8;
          memcpy(payload + len, pad, (size_t)pad_len);
          len += (size_t)pad_len;
          payload[len++] = '"';
        }
        const char tail[] = "},\"requestId\":0}";
        memcpy(payload + len, tail, sizeof tail - 1);
        len += sizeof tail - 1;
        size_t frame_start = stream_len;
        size_t frame_len = append_frame(payload, len);
        if (fault_skip && seq == 0 && conns[0].off == frame_start) conns[0].off += frame_len;
        seq++;
        sent++;
        last_trigger = ts;
        built = 1;
      }
      if (built) flush_all();
      now = mono_ns();
      uint64_t due = start + (uint64_t)((double)sent * 1e9 / rate);
      poll_once(ms_until(due < end ? due : end, now));
    }
    uint64_t send_ns = mono_ns() - start;
    /* The step's end, after its last trigger, to every connection. */
    char endf[512];
    int elen = snprintf(endf, sizeof endf,
                        FLOOR_STEP_END ",\"p\":%d,\"first_seq\":%llu,\"triggers\":%llu,\"start_ns\":%llu,"
                                       "\"last_trigger_ns\":%llu,\"send_ns\":%llu,\"rate_milli\":%llu,"
                                       "\"duration_ms\":%llu,\"payload_bytes\":%ld,\"last\":%d}",
                        s, (unsigned long long)first_seq, (unsigned long long)sent, (unsigned long long)start,
                        (unsigned long long)last_trigger, (unsigned long long)send_ns,
                        (unsigned long long)(rate * 1000 + 0.5), (unsigned long long)(duration * 1000 + 0.5),
                        payload_bytes, s == nsteps - 1);
    if (elen < 0 || (size_t)elen >= sizeof endf) die("snprintf");
    append_frame(endf, (size_t)elen);
    flush_all();
    uint64_t ack_deadline = mono_ns() + (uint64_t)(drain_timeout * 1e9);
    while (acks == 0) {
      uint64_t now = mono_ns();
      if (now >= ack_deadline)
        die("step %d: no acknowledgement from the reader %.1f s after the step's end (%ld connections still "
            "had bytes queued here)",
            s, drain_timeout, queued_conns());
      poll_once(ms_until(ack_deadline, now));
    }
    if (acks > 1) die("step %d: %ld acknowledgements, expected one", s, acks);
    if (queued_conns() != 0) die("step %d: acknowledged with bytes still queued here", s);
    uint64_t cpu = cpu_us() - cpu0;
    uint64_t wall = mono_ns() - start;
    /* Every connection has everything: start the stream over. */
    stream_len = 0;
    for (long i = 0; i < nconns; i++) conns[i].off = 0;
    char stats[512];
    int slen = snprintf(stats, sizeof stats,
                        FLOOR_STEP_STATS ",\"p\":%d,\"cpu_us\":%llu,\"wall_us\":%llu,\"sends\":%llu,"
                                         "\"full\":%llu,\"last\":%d}",
                        s, (unsigned long long)cpu, (unsigned long long)(wall / 1000),
                        (unsigned long long)step_sends, (unsigned long long)step_full, s == nsteps - 1);
    if (slen < 0 || (size_t)slen >= sizeof stats) die("snprintf");
    append_frame(stats, (size_t)slen);
    for (long i = 0; i < nconns; i++)
      if (i != ack_conn) conns[i].off = stream_len;
    flush_conn(ack_conn);
    fprintf(stderr,
            "floor_sender: step %d: %.6g/s, %llu triggers in %.2f s, CPU %.3f s over %.2f s (%.1f us per delivery), "
            "%llu sends, %llu times a socket was full\n",
            s, rate, (unsigned long long)sent, send_ns / 1e9, cpu / 1e6, wall / 1e9,
            sent ? (double)cpu / ((double)sent * (double)nconns) : 0.0, (unsigned long long)step_sends,
            (unsigned long long)step_full);
  }

  /* The reader closes every connection once it has the last figures. */
  finishing = 1;
  uint64_t close_deadline = mono_ns() + (uint64_t)(drain_timeout * 1e9);
  while (closed_count < nconns) {
    uint64_t now = mono_ns();
    if (now >= close_deadline)
      die("%ld/%ld connections closed by the reader %.1f s after the last step", closed_count, nconns, drain_timeout);
    poll_once(ms_until(close_deadline, now));
  }
  fprintf(stderr, "floor_sender: done\n");
  return 0;
}

/* Shared by floor_sender.c and floor_reader.c (tests/bench/floor/README.md):
 * the clock, CPU time, argument parsing and a fatal-error helper. C11 and
 * libc only. */
#ifndef FLOOR_COMMON_H
#define FLOOR_COMMON_H

#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

/* Text frames the sender writes besides the publish frames: the end of a
 * step (to every connection, after the step's last publish frame) and the
 * sender's figures for a step (to the connection the reader acknowledged
 * the step on). */
#define FLOOR_STEP_END "{\"type\":\"floor_step_end\""
#define FLOOR_STEP_STATS "{\"type\":\"floor_step_stats\""
/* What the reader writes: one byte per connection once every connection
 * is open, one byte on its first connection once a step is complete. */
#define FLOOR_READY 'R'
#define FLOOR_ACK 'A'
/* The largest frame either side handles (a 16-bit websocket length). */
#define FLOOR_MAX_PAYLOAD 60000
#define FLOOR_MAX_STEPS 64

static const char *floor_prog = "floor";

__attribute__((noreturn, format(printf, 1, 2))) static void die(const char *fmt, ...) {
  va_list ap;
  fprintf(stderr, "%s: ", floor_prog);
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fputc('\n', stderr);
  exit(1);
}

/* die() with ": strerror(errno)" appended. */
#define die_errno(...)                                                                             \
  do {                                                                                             \
    int e_ = errno;                                                                                \
    char m_[512];                                                                                  \
    snprintf(m_, sizeof m_, __VA_ARGS__);                                                          \
    die("%s: %s", m_, strerror(e_));                                                               \
  } while (0)

static inline uint64_t mono_ns(void) {
  struct timespec ts;
  if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0) die_errno("clock_gettime(CLOCK_MONOTONIC)");
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* This process's CPU time (user + system, which includes the kernel's
 * loopback receive work done in its system calls), microseconds. */
static inline uint64_t cpu_us(void) {
  struct rusage ru;
  if (getrusage(RUSAGE_SELF, &ru) != 0) die_errno("getrusage");
  return (uint64_t)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000u +
         (uint64_t)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
}

static inline long parse_long(const char *flag, const char *s, long min, long max) {
  char *end;
  errno = 0;
  long v = strtol(s, &end, 10);
  if (errno != 0 || end == s || *end != '\0' || v < min || v > max)
    die("%s %s: expected an integer in %ld..%ld", flag, s, min, max);
  return v;
}

static inline double parse_double(const char *flag, const char *s, double min, double max) {
  char *end;
  errno = 0;
  double v = strtod(s, &end);
  if (errno != 0 || end == s || *end != '\0' || !(v >= min && v <= max))
    die("%s %s: expected a number in %g..%g", flag, s, min, max);
  return v;
}

/* The flag's value: argv[*i + 1] (advancing *i), or die. */
static inline const char *flag_value(int argc, char **argv, int *i) {
  if (*i + 1 >= argc) die("%s needs a value (see --help)", argv[*i]);
  *i += 1;
  return argv[*i];
}

/* Finds `"key":` in a control frame's text and parses the unsigned number
 * after it; returns 0 when it is missing or not a number. */
static inline int json_u64(const char *text, size_t len, const char *key, uint64_t *out) {
  char pat[64];
  int n = snprintf(pat, sizeof pat, "\"%s\":", key);
  if (n <= 0 || (size_t)n >= sizeof pat) return 0;
  const char *p = memmem(text, len, pat, (size_t)n);
  if (p == NULL) return 0;
  p += n;
  const char *end = text + len;
  if (p >= end || *p < '0' || *p > '9') return 0;
  uint64_t v = 0;
  while (p < end && *p >= '0' && *p <= '9') v = v * 10 + (uint64_t)(*p++ - '0');
  *out = v;
  return 1;
}

#endif

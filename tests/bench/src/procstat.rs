//! What the bench reads about processes from `/proc`: resident memory
//! (`VmRSS` of `/proc/PID/status`) and CPU time (`utime + stime` of
//! `/proc/PID/stat`), for the server under test and for the bench itself.

use std::sync::OnceLock;

/// The kernel's clock tick (`AT_CLKTCK`), in ticks per second: read from
/// `/proc/self/auxv` (no libc call needed); 100, Linux's value on every
/// common architecture, when it cannot be read.
pub fn clock_ticks_per_second() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| auxv_clock_ticks().unwrap_or(100))
}

/// `AT_CLKTCK` (type 17) from the auxiliary vector of this process.
fn auxv_clock_ticks() -> Option<u64> {
    const AT_CLKTCK: u64 = 17;
    let bytes = std::fs::read("/proc/self/auxv").ok()?;
    let word = std::mem::size_of::<usize>();
    let read = |chunk: &[u8]| -> u64 {
        let mut v = [0u8; 8];
        v[..word].copy_from_slice(chunk);
        u64::from_ne_bytes(v)
    };
    for pair in bytes.chunks_exact(2 * word) {
        let (kind, value) = (read(&pair[..word]), read(&pair[word..]));
        if kind == AT_CLKTCK && value > 0 {
            return Some(value);
        }
        if kind == 0 {
            break;
        }
    }
    None
}

/// `VmRSS` of process `pid` in KiB, or `None` when it cannot be read.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_rss_kib(&status)
}

/// `VmRSS` in KiB from the text of a `/proc/PID/status` file.
fn parse_rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU time (user + system) used so far by process `pid`, in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let ticks = parse_cpu_ticks(&stat)?;
    Some(ticks as f64 / clock_ticks_per_second() as f64)
}

/// CPU time (user + system) used so far by thread `tid` of this process, in seconds.
pub fn thread_cpu_seconds(tid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    let ticks = parse_cpu_ticks(&stat)?;
    Some(ticks as f64 / clock_ticks_per_second() as f64)
}

/// CPU time of this process, in seconds.
pub fn self_cpu_seconds() -> Option<f64> {
    cpu_seconds(std::process::id())
}

/// `utime + stime` (fields 14 and 15) from the text of `/proc/PID/stat`.
/// The command name (field 2) may hold spaces and parentheses, so fields
/// are counted from the last `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // `rest` starts at field 3 (state); utime is field 14.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// How many CPUs this process may run on (`Cpus_allowed_list` of
/// `/proc/self/status`, e.g. `1` or `0-1,3`); 1 when it cannot be read.
pub fn allowed_cpus() -> usize {
    std::fs::read_to_string("/proc/self/status").ok().and_then(|status| parse_allowed_cpus(&status)).unwrap_or(1)
}

fn parse_allowed_cpus(status: &str) -> Option<usize> {
    let list = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?.trim();
    let mut n = 0;
    for range in list.split(',') {
        n += match range.split_once('-') {
            Some((a, b)) => b.trim().parse::<usize>().ok()?.checked_sub(a.trim().parse().ok()?)? + 1,
            None => {
                range.trim().parse::<usize>().ok()?;
                1
            }
        };
    }
    (n > 0).then_some(n)
}

/// A sample of one process: RSS and CPU time, each when readable.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    /// Resident set size, KiB.
    pub rss_kib: Option<u64>,
    /// CPU seconds used so far.
    pub cpu_seconds: Option<f64>,
}

/// Samples process `pid`; all `None` without a pid.
pub fn sample(pid: Option<u32>) -> Sample {
    match pid {
        Some(pid) => Sample { rss_kib: rss_kib(pid), cpu_seconds: cpu_seconds(pid) },
        None => Sample::default(),
    }
}

/// `b - a` when both are known.
pub fn delta(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(b? - a?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rss() {
        let status = "Name:\tx\nVmPeak:\t  100 kB\nVmRSS:\t   4242 kB\nThreads: 3\n";
        assert_eq!(parse_rss_kib(status), Some(4242));
        assert_eq!(parse_rss_kib("Name: x\n"), None);
    }

    #[test]
    fn parses_cpu_ticks_with_odd_command_names() {
        let stat = "123 (my (odd) name) S 1 123 123 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 4 0 1000 0 0";
        assert_eq!(parse_cpu_ticks(stat), Some(300));
    }

    #[test]
    fn parses_allowed_cpus() {
        assert_eq!(parse_allowed_cpus("Name: x\nCpus_allowed_list:\t1\n"), Some(1));
        assert_eq!(parse_allowed_cpus("Cpus_allowed_list:\t0-1,3\n"), Some(3));
        assert_eq!(parse_allowed_cpus("Cpus_allowed_list:\t0-3,8-11\n"), Some(8));
        assert_eq!(parse_allowed_cpus("Cpus_allowed_list:\tx\n"), None);
        assert_eq!(parse_allowed_cpus("Name: x\n"), None);
    }

    #[test]
    fn reads_this_process() {
        assert!(rss_kib(std::process::id()).is_some_and(|kib| kib > 0));
        assert!(self_cpu_seconds().is_some());
        assert!(clock_ticks_per_second() >= 1);
    }
}

//! What the bench reads from the system: CPU time and peak RSS from /proc, the size of a
//! data directory, and the broker's version from its AMQP greeting.

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

/// The sum of the sizes of the files under `path`.
pub fn dir_size(path: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(path)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_dir() {
            total += dir_size(&entry.path())?;
        } else if meta.is_file() {
            total += meta.len();
        }
    }
    Ok(total)
}

// /proc readers.

/// User + system CPU seconds of `pid` ("self" for this process) from /proc.
pub(super) fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let ticks = parse_stat_cpu_ticks(&stat)?;
    // SAFETY: sysconf reads a constant of the system.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as f64 } else { 100.0 };
    Some(ticks as f64 / hz)
}

/// utime + stime (clock ticks) from a /proc/<pid>/stat line: fields 14 and 15, counted
/// after the command name, which may itself hold spaces and parentheses.
pub fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (the state).
    let utime: u64 = fields.get(14 - 3)?.parse().ok()?;
    let stime: u64 = fields.get(15 - 3)?.parse().ok()?;
    Some(utime + stime)
}

/// Peak resident set in KiB (VmHWM) of `pid` ("self" for this process).
pub(super) fn peak_rss_kib(pid: &str) -> Option<u64> {
    parse_vm_hwm_kib(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

pub fn parse_vm_hwm_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

// ---------------------------------------------------------------------------------------
// The broker's version, from its greeting.

/// The broker's product and version from the server properties of its `connection.start`
/// (lapin does not keep them): a bare handshake that reads the greeting and hangs up.
/// "unknown" over TLS or when anything goes wrong; the bench does not depend on it.
pub(super) async fn broker_version(url: &str) -> String {
    let Ok(uri) = url.parse::<lapin::uri::AMQPUri>() else {
        return "unknown".into();
    };
    if uri.scheme == lapin::uri::AMQPScheme::AMQPS {
        return "unknown (TLS)".into();
    }
    let (host, port) = (uri.authority.host.clone(), uri.authority.port);
    let read = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
        let addr = std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))?
            .next()
            .ok_or_else(|| std::io::Error::other("no address"))?;
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"AMQP\x00\x00\x09\x01")?;
        let mut header = [0u8; 7];
        s.read_exact(&mut header)?;
        let size = u32::from_be_bytes([header[3], header[4], header[5], header[6]]) as usize;
        if size > 1 << 20 {
            return Err(std::io::Error::other("frame too large"));
        }
        let mut payload = vec![0u8; size];
        s.read_exact(&mut payload)?;
        Ok(payload)
    });
    match read.await {
        Ok(Ok(payload)) => match parse_connection_start(&payload) {
            Some((product, version)) => format!("{product} {version}"),
            None => "unknown".into(),
        },
        _ => "unknown".into(),
    }
}

/// (product, version) from a `connection.start` method frame's payload (class 10,
/// method 10, two version octets, then the server properties table).
pub fn parse_connection_start(payload: &[u8]) -> Option<(String, String)> {
    if !payload.starts_with(&[0, 10, 0, 10]) {
        return None;
    }
    let mut r = Reader(payload.get(6..)?);
    let len = r.u32()? as usize;
    let mut t = Reader(r.take(len)?);
    let (mut product, mut version) = (None, None);
    while !t.0.is_empty() {
        let klen = t.u8()? as usize;
        let key = String::from_utf8_lossy(t.take(klen)?).into_owned();
        let kind = t.u8()?;
        let value = t.value(kind)?;
        match key.as_str() {
            "product" => product = value,
            "version" => version = value,
            _ => {}
        }
    }
    Some((product?, version?))
}

/// A cursor over AMQP field-table bytes.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u32(&mut self) -> Option<u32> {
        let b = self.take(4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn skip(&mut self, n: usize) -> Option<Option<String>> {
        self.take(n).map(|_| None)
    }
    /// Reads a field value of type `kind`; long strings are returned, the rest skipped.
    fn value(&mut self, kind: u8) -> Option<Option<String>> {
        let skip = Self::skip;
        match kind {
            b'S' => {
                let n = self.u32()? as usize;
                Some(Some(String::from_utf8_lossy(self.take(n)?).into_owned()))
            }
            b'F' | b'A' | b'x' => {
                let n = self.u32()? as usize;
                skip(self, n)
            }
            b't' | b'b' | b'B' => skip(self, 1),
            b's' | b'u' => skip(self, 2),
            b'I' | b'i' | b'f' => skip(self, 4),
            b'l' | b'L' | b'd' | b'T' => skip(self, 8),
            b'D' => skip(self, 5),
            b'V' => Some(None),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_parse() {
        let stat = "1234 (journey man (x)) S 1 1234 1234 0 -1 4194560 5000 0 0 0 250 75 0 0 20 0 9 0 100 1000000 5000 18446744073709551615";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(325));
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
        let status =
            "Name:\tjourneyman\nVmPeak:\t  300000 kB\nVmHWM:\t   65536 kB\nVmRSS:\t   60000 kB\n";
        assert_eq!(parse_vm_hwm_kib(status), Some(65536));
        assert_eq!(parse_vm_hwm_kib("Name: x\n"), None);
        // This process has both.
        assert!(cpu_seconds("self").is_some());
        assert!(peak_rss_kib("self").unwrap() > 0);
    }

    #[test]
    fn the_brokers_greeting_gives_its_version() {
        let mut table = Vec::new();
        let mut field = |key: &str, kind: u8, value: &[u8]| {
            table.push(key.len() as u8);
            table.extend_from_slice(key.as_bytes());
            table.push(kind);
            table.extend_from_slice(value);
        };
        let long = |s: &str| {
            let mut v = (s.len() as u32).to_be_bytes().to_vec();
            v.extend_from_slice(s.as_bytes());
            v
        };
        let mut caps = Vec::new();
        caps.push(9u8);
        caps.extend_from_slice(b"basic.ack");
        caps.push(b't');
        caps.push(1);
        let mut nested = (caps.len() as u32).to_be_bytes().to_vec();
        nested.extend_from_slice(&caps);
        field("capabilities", b'F', &nested);
        field("cluster_name", b'S', &long("rabbit@host"));
        field("product", b'S', &long("RabbitMQ"));
        field("version", b'S', &long("3.10.8"));
        let mut payload = vec![0, 10, 0, 10, 0, 9];
        payload.extend_from_slice(&(table.len() as u32).to_be_bytes());
        payload.extend_from_slice(&table);
        payload.extend_from_slice(&long("PLAIN AMQPLAIN"));
        assert_eq!(
            parse_connection_start(&payload),
            Some(("RabbitMQ".into(), "3.10.8".into()))
        );
        assert_eq!(parse_connection_start(&payload[..20]), None);
        assert_eq!(parse_connection_start(&[0, 10, 0, 11, 0, 9]), None);
    }
}

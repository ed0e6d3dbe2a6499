//! HAProxy in front of several service instances: its configuration (least connections,
//! `maxconn` per server set to each instance's capacity so excess requests wait in HAProxy's
//! queue, health checks on `/healthz`), the process, and its per-server statistics.

use crate::client;
use bytes::Bytes;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The `haproxy` program, if installed (on `PATH` or in `/usr/sbin`).
pub fn find() -> Option<PathBuf> {
    crate::instance::find_program(
        "haproxy",
        &[PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")],
    )
}

/// The configuration for a frontend at `front`, a statistics page at `stats`, and `servers`
/// (name, address), each taking at most `maxconn` requests at once.
pub fn config(
    front: SocketAddr,
    stats: SocketAddr,
    servers: &[(String, SocketAddr)],
    maxconn: usize,
) -> String {
    let mut c = format!(
        "\
global
    maxconn 4096

defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    # A request waits this long in HAProxy's queue for a server slot, then gets a 503.
    timeout queue 10s
    # A health check's answer may take this long (without it HAProxy allows only `inter`,
    # 200 ms, and a busy but healthy instance would be marked down under load). A dead one is
    # still seen at once: its connection fails (`observe layer4`), within min(connect, inter).
    timeout check 5s
    # Retried on another server: a connection refused (a dead instance not yet marked down)
    # and an instance's 503 (it did not take the request: at capacity, or draining). Not
    # retried: a request an instance took and then failed to answer (it may have run).
    retries 3
    option redispatch 1
    retry-on conn-failure 503

frontend inference
    bind {front}
    default_backend instances

backend instances
    balance leastconn
    option httpchk GET /healthz
    http-check expect status 200
    # Which instance answered (HAProxy's own answers too, e.g. a 502 from a dead one).
    http-after-response set-header x-server %s
    # A connection error counts as a failed check and the next check follows within `inter`,
    # so a dead server is down within about 200 ms (least-connections would otherwise
    # send every new request to a dead server: it holds the fewest), until the health check
    # sees it healthy again.
    default-server check inter 200ms fall 2 rise 2 maxconn {maxconn} observe layer4 error-limit 1 on-error fail-check
"
    );
    for (name, addr) in servers {
        c.push_str(&format!("    server {name} {addr}\n"));
    }
    c.push_str(&format!(
        "
frontend stats
    bind {stats}
    stats enable
    stats uri /stats
"
    ));
    c
}

/// A running HAProxy. Dropping it stops the process.
#[derive(Debug)]
pub struct HaProxy {
    child: Child,
    /// Its statistics page.
    pub stats: SocketAddr,
}

impl HaProxy {
    /// Checks `config`, writes it into `dir` and starts `program` on it in the foreground
    /// (its output goes to `dir/haproxy.log`).
    pub fn start(
        program: &Path,
        dir: &Path,
        config: &str,
        stats: SocketAddr,
    ) -> Result<HaProxy, String> {
        let file = dir.join("haproxy.cfg");
        std::fs::write(&file, config).map_err(|e| format!("writing {}: {e}", file.display()))?;
        let check = Command::new(program)
            .arg("-c")
            .arg("-f")
            .arg(&file)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
        if !check.status.success() {
            return Err(format!(
                "haproxy refused the configuration:\n{}{}",
                String::from_utf8_lossy(&check.stdout),
                String::from_utf8_lossy(&check.stderr)
            ));
        }
        // Its messages (a port it cannot bind, a server going down) go to haproxy.log beside
        // the configuration.
        let log = std::fs::File::create(dir.join("haproxy.log"))
            .map_err(|e| format!("creating haproxy.log: {e}"))?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new(program)
            .arg("-db")
            .arg("-f")
            .arg(&file)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
        Ok(HaProxy { child, stats })
    }

    /// Stops HAProxy (SIGTERM, then SIGKILL after `within`).
    pub fn stop(&mut self, within: Duration) {
        if let Ok(None) = self.child.try_wait() {
            crate::sys::terminate(&self.child);
            let _ = crate::instance::wait_or_kill(&mut self.child, within);
        }
    }
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(2));
    }
}

/// One server's line of HAProxy's statistics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerStat {
    /// The server's name.
    pub name: String,
    /// `UP`, `DOWN`, `UP 1/2` (going down), `DOWN 1/2` (coming up), `MAINT`, ….
    pub status: String,
    /// Requests (sessions) it has taken in all.
    pub total: u64,
    /// Requests it holds now.
    pub current: u64,
    /// Requests waiting in its queue now.
    pub queued: u64,
}

impl ServerStat {
    /// Whether HAProxy sends it requests.
    pub fn is_up(&self) -> bool {
        self.status.starts_with("UP")
    }

    /// Whether HAProxy has marked it down.
    pub fn is_down(&self) -> bool {
        self.status.starts_with("DOWN")
    }
}

/// Parses HAProxy's CSV statistics: the servers of backend `backend`.
pub fn parse_stats(csv: &str, backend: &str) -> Result<Vec<ServerStat>, String> {
    let mut lines = csv.lines();
    let header = lines
        .next()
        .and_then(|h| h.strip_prefix("# "))
        .ok_or("the statistics have no header line")?;
    let cols: Vec<&str> = header.split(',').collect();
    let col = |name: &str| {
        cols.iter()
            .position(|c| *c == name)
            .ok_or(format!("the statistics have no {name:?} column"))
    };
    let (px, sv, st, stot, scur, qcur) = (
        col("pxname")?,
        col("svname")?,
        col("status")?,
        col("stot")?,
        col("scur")?,
        col("qcur")?,
    );
    let num = |s: Option<&&str>| s.and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Ok(lines
        .map(|l| l.split(',').collect::<Vec<_>>())
        .filter(|f| f.get(px) == Some(&backend))
        .filter(|f| !matches!(f.get(sv), Some(&"BACKEND") | Some(&"FRONTEND") | None))
        .map(|f| ServerStat {
            name: f[sv].to_string(),
            status: f.get(st).unwrap_or(&"").to_string(),
            total: num(f.get(stot)),
            current: num(f.get(scur)),
            queued: num(f.get(qcur)),
        })
        .collect())
}

/// Reads the servers' statistics of backend `instances` from the page at `stats`.
pub async fn server_stats(stats: SocketAddr) -> Result<Vec<ServerStat>, String> {
    let (code, _, body) = client::request(
        stats,
        "/stats;csv",
        Bytes::new(),
        &[],
        Duration::from_secs(2),
    )
    .await?;
    if code != 200 {
        return Err(format!("the statistics page answered {code}"));
    }
    parse_stats(&String::from_utf8_lossy(&body), "instances")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_are_read_by_column_name() {
        let csv = "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,wredis,status,\n\
                   inference,FRONTEND,,,1,2,4096,10,0,0,0,0,0,,,,,OPEN,\n\
                   instances,s0,0,0,3,4,4,120,0,0,,0,,0,0,0,0,UP,\n\
                   instances,s1,2,3,0,4,4,7,0,0,,0,,0,0,0,0,DOWN 1/2,\n\
                   instances,BACKEND,0,0,3,8,,127,0,0,0,0,,0,0,0,0,UP,\n";
        let s = parse_stats(csv, "instances").unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(
            (s[0].name.as_str(), s[0].total, s[0].current),
            ("s0", 120, 3)
        );
        assert!(s[0].is_up() && !s[0].is_down());
        assert_eq!(s[1].queued, 2);
        assert!(s[1].is_down());
    }

    #[test]
    fn the_configuration_names_every_server_with_its_maxconn() {
        let a: SocketAddr = "127.0.0.1:9001".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:9002".parse().unwrap();
        let c = config(a, b, &[("s0".into(), a), ("s1".into(), b)], 8);
        assert!(c.contains("balance leastconn"));
        assert!(c.contains("maxconn 8"));
        assert!(c.contains("server s1 127.0.0.1:9002"));
        assert!(c.contains("option httpchk GET /healthz"));
    }
}

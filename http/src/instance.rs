//! Running the service as a child process (for the load test, the scale-out scenario and the
//! tests): start it, wait until it listens, stop it with SIGTERM or SIGKILL, always bounded.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The service's program beside the running one (all of this crate's programs are built into
/// the same folder).
pub fn service_program() -> PathBuf {
    let me = std::env::current_exe().unwrap_or_default();
    let dir = me.parent().unwrap_or(Path::new("."));
    // Test binaries live one folder deeper (target/<profile>/deps).
    let here = dir.join("stateful-pool-http");
    if here.exists() {
        return here;
    }
    dir.parent()
        .map(|d| d.join("stateful-pool-http"))
        .unwrap_or(here)
}

/// A running service process. Dropping it kills the process (and waits for it).
#[derive(Debug)]
pub struct Instance {
    child: Child,
    /// The address it listens on.
    pub addr: SocketAddr,
    output: Arc<Mutex<String>>,
}

impl Instance {
    /// Starts `program` with `args` (which should include `--listen 127.0.0.1:PORT`; port 0
    /// picks a free one) and waits up to `within` for it to say where it listens.
    pub fn start(program: &Path, args: &[String], within: Duration) -> Result<Instance, String> {
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
        let output = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        for pipe in [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let (tx, output) = (tx.clone(), output.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if let Some(rest) = line.strip_prefix("listening on http://") {
                        let addr = rest.split_whitespace().next().unwrap_or_default();
                        let _ = tx.send(addr.parse::<SocketAddr>().ok());
                    }
                    let mut o = output.lock().unwrap_or_else(|e| e.into_inner());
                    o.push_str(&line);
                    o.push('\n');
                }
            });
        }
        drop(tx);
        let deadline = Instant::now() + within;
        let addr = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left.min(Duration::from_millis(100))) {
                Ok(Some(a)) => break Ok(a),
                Ok(None) => break Err("it printed an address that does not parse".to_string()),
                Err(mpsc::RecvTimeoutError::Timeout) if left > Duration::ZERO => {
                    if let Ok(Some(st)) = child.try_wait() {
                        break Err(format!("it exited ({st}) before listening"));
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    break Err(format!("it did not listen within {within:?}"));
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let st = child.wait().map(|s| s.to_string()).unwrap_or_default();
                    break Err(format!("it exited ({st}) before listening"));
                }
            }
        };
        let mut inst = Instance {
            child,
            addr: "127.0.0.1:0".parse().expect("a valid address"),
            output,
        };
        match addr {
            Ok(a) => {
                inst.addr = a;
                Ok(inst)
            }
            Err(e) => {
                inst.kill();
                Err(format!(
                    "{} {}: {e}; its output:\n{}",
                    program.display(),
                    args.join(" "),
                    inst.output()
                ))
            }
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the process printed so far (stdout and stderr).
    pub fn output(&self) -> String {
        self.output
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Kills the process with SIGKILL (no drain) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM (the service drains), then waits up to `within` for the exit; kills it
    /// if it takes longer.
    pub fn terminate(&mut self, within: Duration) -> Result<ExitStatus, String> {
        if let Ok(Some(st)) = self.child.try_wait() {
            return Ok(st);
        }
        crate::sys::terminate(&self.child);
        self.wait(within)
    }

    /// Waits up to `within` for the process to exit; kills it if it takes longer.
    pub fn wait(&mut self, within: Duration) -> Result<ExitStatus, String> {
        wait_or_kill(&mut self.child, within)
    }
}

/// Waits up to `within` for `child` to exit; kills (and reaps) it if it takes longer.
pub fn wait_or_kill(child: &mut Child, within: Duration) -> Result<ExitStatus, String> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        match child.try_wait() {
            Ok(Some(st)) => return Ok(st),
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(e.to_string()),
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    Err(format!("it did not exit within {within:?}; killed"))
}

/// The program `name` on `PATH`, or else in one of `also`.
pub fn find_program(name: &str, also: &[PathBuf]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(also.iter().cloned())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
    }
}

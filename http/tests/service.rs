//! The HTTP service end to end: each test starts the real program on a loopback port and
//! talks HTTP to it (hyper, or raw bytes for malformed requests). Waits are on events (an
//! answer, a counter in /metrics), each bounded.

use bytes::Bytes;
use stateful_pool_http::client::request;
use stateful_pool_http::instance::Instance;
use stateful_pool_http::reply::{ErrorBody, Prediction};
use stateful_pool_http::samples;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const PROGRAM: &str = env!("CARGO_BIN_EXE_stateful-pool-http");
const T: Duration = Duration::from_secs(60);

/// A small model on a loopback port of the system's choosing: every test's service.
const SMALL: [&str; 8] = [
    "--listen",
    "127.0.0.1:0",
    "--image-size",
    "8",
    "--hidden",
    "16",
    "--classes",
    "5",
];

struct Svc {
    inst: Instance,
    faults: PathBuf,
}

impl Svc {
    fn start(extra: &[&str]) -> Svc {
        let faults = std::env::temp_dir().join(format!(
            "sph-test-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&faults).unwrap();
        let mut args: Vec<String> = SMALL.map(String::from).to_vec();
        args.extend(["--fault-injection".into(), faults.to_str().unwrap().into()]);
        // A generous default deadline: a debug build on a loaded 2-core machine takes seconds
        // for the large images. Tests of the deadline shorten it per request.
        args.extend(["--timeout-ms".into(), "60000".into()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let inst = Instance::start(PROGRAM.as_ref(), &args, T).expect("the service starts");
        Svc { inst, faults }
    }

    fn addr(&self) -> SocketAddr {
        self.inst.addr
    }

    async fn post(
        &self,
        body: Vec<u8>,
        headers: &[(&str, &str)],
    ) -> (u16, hyper::HeaderMap, Bytes) {
        request(self.addr(), "/predict", Bytes::from(body), headers, T)
            .await
            .expect("an answer")
    }

    async fn get(&self, path: &str) -> (u16, hyper::HeaderMap, Bytes) {
        request(self.addr(), path, Bytes::new(), &[], T)
            .await
            .expect("an answer")
    }

    async fn metrics(&self) -> String {
        let (code, _, body) = self.get("/metrics").await;
        assert_eq!(code, 200);
        String::from_utf8(body.to_vec()).unwrap()
    }

    /// Waits (bounded) until the /metrics line starting with `prefix` has value `v`.
    async fn wait_metric(&self, prefix: &str, v: f64) {
        let deadline = Instant::now() + T;
        loop {
            let m = self.metrics().await;
            let now = m
                .lines()
                .find(|l| l.starts_with(prefix))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|x| x.parse::<f64>().ok());
            if now == Some(v) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{prefix} never reached {v}; last:\n{m}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Svc {
    /// Sends a request held in the worker until [`release`](Self::release)`(name)`, on a
    /// task of its own.
    fn spawn_held(
        &self,
        name: &str,
    ) -> tokio::task::JoinHandle<Result<(u16, hyper::HeaderMap, Bytes), String>> {
        let (a, fault) = (self.addr(), format!("hold={name}"));
        tokio::spawn(async move {
            let png = Bytes::from(samples::png(0, 64));
            request(a, "/predict", png, &[("x-fault", &fault)], T).await
        })
    }

    /// Lets requests held with `x-fault: hold=NAME` go on.
    fn release(&self, name: &str) {
        std::fs::write(self.faults.join(name), b"go").unwrap();
    }
}

impl Drop for Svc {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.faults);
    }
}

fn error(body: &Bytes) -> ErrorBody {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(body)))
}

/// Sends raw bytes, then reads the answer until the server closes or `limit` passes.
fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    // Read the head and as much body as the server sends (it closes after an error).
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&out);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head.lines().find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
            });
            if len.is_some_and(|n| body.len() >= n) {
                break;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prediction_through_the_pool_equals_the_direct_one() {
    let pool = Svc::start(&[]);
    let direct = Svc::start(&["--mode", "direct"]);
    for i in [0, 5, 11] {
        let (code, headers, png) = pool.get(&format!("/samples/{i}?size=40")).await;
        assert_eq!(code, 200);
        assert_eq!(headers["content-type"], "image/png");
        assert_eq!(png.to_vec(), samples::png(i, 40));
        let (code, headers, body) = pool.post(png.to_vec(), &[]).await;
        assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
        assert_eq!(headers["x-instance"], "sph");
        let p: Prediction = serde_json::from_slice(&body).unwrap();
        assert_eq!(p.probabilities.len(), 5);
        assert!((p.probabilities.iter().sum::<f32>() - 1.0).abs() < 1e-4);
        assert!(
            p.probabilities
                .iter()
                .all(|&x| x <= p.probabilities[p.class])
        );
        let (code, _, body) = direct.post(png.to_vec(), &[]).await;
        assert_eq!(code, 200);
        let d: Prediction = serde_json::from_slice(&body).unwrap();
        assert_eq!(d.class, p.class);
        for (a, b) in d.probabilities.iter().zip(&p.probabilities) {
            assert!((a - b).abs() < 1e-5, "{d:?} vs {p:?}");
        }
    }
    // The deadline holds in direct mode too: passed on arrival, a 504 that says where.
    for svc in [&pool, &direct] {
        let (code, _, body) = svc
            .post(samples::png(0, 64), &[("x-timeout-ms", "0")])
            .await;
        assert_eq!(code, 504, "{body:?}");
        assert_eq!(error(&body).stage.as_deref(), Some("body"));
    }
    // A large image (a 1.3 MB body, in shared memory) is answered too.
    let big = samples::png(1, 1500);
    assert!(big.len() > 1_000_000);
    let (code, _, _) = pool.post(big, &[]).await;
    assert_eq!(code, 200);

    let (code, _, body) = pool.get("/healthz").await;
    assert_eq!((code, &body[..]), (200, &b"ok\n"[..]));
    let (code, headers, _) = pool.get("/metrics").await;
    assert_eq!(code, 200);
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let m = pool.metrics().await;
    for line in [
        "http_requests_total{route=\"/predict\",code=\"200\"} 4",
        "stateful_pool_server_capacity 64",
        "stateful_pool_stage_items_total{stage=\"seq[0]/preprocess\",outcome=\"done\"} 4",
        "stateful_pool_stage_items_total{stage=\"seq[1]/model\",outcome=\"done\"} 4",
        "stateful_pool_stage_live_workers{stage=\"seq[1]/model\",kind=\"process\"} 1",
        "# EOF",
    ] {
        assert!(m.contains(line), "missing {line:?} in\n{m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_a_4xx_with_a_reason() {
    let svc = Svc::start(&["--max-body-bytes", "100000", "--body-timeout-ms", "1500"]);
    let (code, _, body) = svc.post(b"not an image at all".to_vec(), &[]).await;
    assert_eq!(code, 400);
    assert!(error(&body).error.starts_with("bad image"), "{body:?}");
    // A truncated PNG gets past the format sniffing: the preprocessing worker refuses it.
    let mut png = samples::png(1, 64);
    png.truncate(png.len() / 2);
    let (code, _, body) = svc.post(png, &[]).await;
    assert_eq!(code, 400, "{body:?}");
    assert!(error(&body).error.starts_with("bad image"));
    let (code, _, _) = svc
        .post(samples::png(1, 64), &[("x-timeout-ms", "soon")])
        .await;
    assert_eq!(code, 400);
    // The router's own answers carry the instance's name too.
    let (code, headers, _) = svc.get("/predict").await;
    assert_eq!(code, 405);
    assert_eq!(headers["x-instance"], "sph");
    let (code, headers, _) = svc.get("/nowhere").await;
    assert_eq!(code, 404);
    assert_eq!(headers["x-instance"], "sph");
    let (code, headers, _) = svc.get("/samples/99").await;
    assert_eq!(code, 400);
    assert_eq!(headers["x-instance"], "sph");
    let (code, headers, _) = svc.get("/samples/3?size=abc").await;
    assert_eq!(code, 400);
    assert_eq!(headers["x-instance"], "sph");
    // A deadline too large for a number is as good as none (the service's own caps it).
    let (code, _, body) = svc
        .post(
            samples::png(1, 64),
            &[("x-timeout-ms", "99999999999999999999999")],
        )
        .await;
    assert_eq!(code, 200, "{body:?}");
    // A deadline of 0 has passed on arrival: a 504 that says where.
    let (code, _, body) = svc
        .post(samples::png(1, 64), &[("x-timeout-ms", "0")])
        .await;
    assert_eq!(code, 504, "{body:?}");
    assert!(error(&body).stage.is_some(), "{body:?}");
    // A real body over the limit (not just a header announcing one) still gets its 413.
    let (code, _, body) = svc.post(vec![7u8; 2_000_000], &[]).await;
    assert_eq!(code, 413, "{body:?}");

    // Malformed at the HTTP level, sent as raw bytes: each request and the status it gets.
    let cases: [(&[u8], &str); 4] = [
        (b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n", "400"),
        (b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-length: 100001\r\n\r\n", "413"),
        (
            b"POST /predict HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            "411",
        ),
        // A slow client: the head, then 10 of the 1000 bytes it announced, then nothing.
        (b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n0123456789", "408"),
    ];
    for (request, status) in cases {
        let answer = raw(svc.addr(), request);
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{answer}"
        );
    }
    // The service still serves.
    let (code, _, _) = svc.post(samples::png(2, 64), &[]).await;
    assert_eq!(code, 200);
}

/// A client that writes its whole request before it reads (as Python's `http.client` does)
/// still gets the answer to a request refused on its head: the body is read and thrown away
/// beside the answer, so the connection is not reset under the client's writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_writes_a_refused_body_first_still_reads_the_answer() {
    let svc = Svc::start(&["--max-body-bytes", "100000"]);
    let addr = svc.addr();
    let answers = tokio::task::spawn_blocking(move || {
        let mut big =
            b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-length: 8000000\r\n\r\n".to_vec();
        big.resize(big.len() + 8_000_000, 7);
        let mut chunked =
            b"POST /predict HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        for _ in 0..64 {
            chunked.extend_from_slice(b"4000\r\n");
            chunked.resize(chunked.len() + 0x4000, 1);
            chunked.extend_from_slice(b"\r\n");
        }
        chunked.extend_from_slice(b"0\r\n\r\n");
        // A body sent to a route that takes none: a wrong method, an unknown path.
        let elsewhere = |head: &[u8]| {
            let mut r = head.to_vec();
            r.extend_from_slice(b"host: x\r\ncontent-length: 5000000\r\n\r\n");
            r.resize(r.len() + 5_000_000, 3);
            raw(addr, &r)
        };
        [
            raw(addr, &big),
            raw(addr, &chunked),
            elsewhere(b"PUT /predict HTTP/1.1\r\n"),
            elsewhere(b"POST /nope HTTP/1.1\r\n"),
        ]
    })
    .await
    .unwrap();
    assert!(answers[0].starts_with("HTTP/1.1 413"), "{}", &answers[0]);
    assert!(answers[1].starts_with("HTTP/1.1 411"), "{}", &answers[1]);
    assert!(answers[2].starts_with("HTTP/1.1 405"), "{}", &answers[2]);
    assert!(answers[3].starts_with("HTTP/1.1 404"), "{}", &answers[3]);
    let (code, _, _) = svc.post(samples::png(2, 64), &[]).await;
    assert_eq!(code, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_service_answers_503_with_retry_after() {
    let svc = Svc::start(&["--capacity", "2", "--retry-after-s", "3"]);
    // Two requests held in the worker until the file `go` exists.
    let held = || svc.post(samples::png(0, 64), &[("x-fault", "hold=go")]);
    let (a, b, third) = tokio::join!(held(), held(), async {
        svc.wait_metric("stateful_pool_server_in_flight ", 2.0)
            .await;
        svc.wait_metric("http_admitted ", 2.0).await;
        let r = svc.post(samples::png(0, 64), &[]).await;
        svc.release("go");
        r
    });
    assert_eq!((a.0, b.0), (200, 200));
    let (code, headers, body) = third;
    assert_eq!(code, 503, "{body:?}");
    assert_eq!(headers["retry-after"], "3");
    assert!(error(&body).error.contains("capacity"));
    let (code, _, _) = svc.post(samples::png(0, 64), &[]).await;
    assert_eq!(code, 200);
    // A request still sending its body holds a place too, and shows as admitted.
    let mut slow = TcpStream::connect(svc.addr()).unwrap();
    slow.write_all(b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n0123")
        .unwrap();
    svc.wait_metric("http_admitted ", 1.0).await;
    drop(slow);
    svc.wait_metric("http_admitted ", 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passed_deadline_is_504_and_worker_faults_are_500_naming_the_stage() {
    let svc = Svc::start(&[]);
    let (code, _, body) = svc
        .post(
            samples::png(0, 64),
            &[("x-fault", "sleep=3000"), ("x-timeout-ms", "1500")],
        )
        .await;
    assert_eq!(code, 504);
    assert_eq!(error(&body).stage.as_deref(), Some("seq[0]/preprocess"));

    // Faults, each followed by laps of small and large requests on the same workers.
    for fault in ["panic", "exit", "fail"] {
        let (code, _, body) = svc.post(samples::png(0, 64), &[("x-fault", fault)]).await;
        assert_eq!(code, 500, "{fault}: {body:?}");
        let e = error(&body);
        assert_eq!(e.stage.as_deref(), Some("seq[0]/preprocess"), "{fault}");
        assert!(
            e.error.contains("seq[0]/preprocess"),
            "{fault}: {}",
            e.error
        );
        for lap in 0..6 {
            let side = if lap % 3 == 2 { 900 } else { 64 };
            let (code, _, body) = svc.post(samples::png(lap, side), &[]).await;
            assert_eq!(code, 200, "{fault}, lap {lap}: {body:?}");
        }
    }
    let m = svc.metrics().await;
    assert!(
        m.contains("http_requests_total{route=\"/predict\",code=\"500\"} 3"),
        "{m}"
    );
    assert!(
        m.contains("http_requests_total{route=\"/predict\",code=\"504\"} 1"),
        "{m}"
    );
}

/// A preprocessing worker that keeps dying runs out of restarts: its stage is failed,
/// `/healthz` answers 503 and so do requests. With `--revive-after-ms` the worker is started
/// again later, and the instance serves and reports healthy without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_that_ran_out_of_restarts_is_revived_and_serves_again() {
    // Revived 3 s after it failed: ample time to see it failed first.
    let svc = Svc::start(&["--revive-after-ms", "3000"]);
    // The default budget is 5 restarts a minute: the sixth death fails the stage, and a
    // request then finds no worker (503) instead of killing one (500).
    let mut deaths = 0;
    loop {
        let (code, _, body) = svc.post(samples::png(0, 64), &[("x-fault", "exit")]).await;
        assert_eq!(error(&body).stage.as_deref(), Some("seq[0]/preprocess"));
        if code == 503 {
            break;
        }
        assert_eq!(code, 500, "{body:?}");
        deaths += 1;
        assert!(deaths <= 12, "the stage survived {deaths} deaths");
    }
    assert_eq!(deaths, 6);
    assert_eq!(svc.get("/healthz").await.0, 503);
    // Revived: healthy again, and serving, small and large images.
    let deadline = Instant::now() + Duration::from_secs(60);
    while svc.get("/healthz").await.0 != 200 {
        assert!(Instant::now() < deadline, "the stage was never revived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for lap in 0..4 {
        let side = if lap % 2 == 1 { 900 } else { 64 };
        let (code, _, body) = svc.post(samples::png(lap, side), &[]).await;
        assert_eq!(code, 200, "lap {lap}: {body:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_cancels_its_queued_request() {
    let svc = Svc::start(&[]);
    let a = svc.addr();
    // A occupies the only preprocessing worker until the file `goA` exists.
    let first = svc.spawn_held("goA");
    svc.wait_metric(
        "stateful_pool_stage_in_flight{stage=\"seq[0]/preprocess\"",
        1.0,
    )
    .await;
    // B queues behind it, then its client goes away.
    let png = samples::png(1, 64);
    let mut b = TcpStream::connect(a).unwrap();
    write!(
        b,
        "POST /predict HTTP/1.1\r\nhost: x\r\nx-fault: mark=queuedB\r\ncontent-length: {}\r\n\r\n",
        png.len()
    )
    .unwrap();
    b.write_all(&png).unwrap();
    svc.wait_metric(
        "stateful_pool_stage_in_flight{stage=\"seq[0]/preprocess\"",
        2.0,
    )
    .await;
    drop(b);
    svc.wait_metric("http_requests_total{route=\"/predict\",code=\"499\"}", 1.0)
        .await;
    svc.release("goA");
    let (code, _, _) = first.await.unwrap().unwrap();
    assert_eq!(code, 200);
    // C comes after B in the same queue: once C is answered, B would have run.
    let (code, _, _) = svc
        .post(samples::png(2, 64), &[("x-fault", "mark=afterC")])
        .await;
    assert_eq!(code, 200);
    assert!(svc.faults.join("afterC").exists());
    assert!(
        !svc.faults.join("queuedB").exists(),
        "the cancelled request ran"
    );
}

/// A client that closes its sending side mid-body still reads: it gets a 400 (499 is no HTTP
/// status), and the metrics count the request as 499.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_half_closes_mid_body_reads_a_400() {
    let svc = Svc::start(&[]);
    let addr = svc.addr();
    let answer = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        s.write_all(b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nabc")
            .unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    svc.wait_metric("http_requests_total{route=\"/predict\",code=\"499\"}", 1.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_connections_are_closed() {
    let svc = Svc::start(&["--header-timeout-ms", "1000"]);
    // A connection that sends nothing, and one that sends half a request head: both are
    // closed by the service (read returns 0), not kept forever.
    for bytes in [&b""[..], &b"POST /predict HTTP/1.1\r\nhost: x\r\n"[..]] {
        let mut s = TcpStream::connect(svc.addr()).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        s.write_all(bytes).unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        let text = String::from_utf8_lossy(&buf);
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 408"),
            "{text}"
        );
    }
    let (code, _, _) = svc.post(samples::png(2, 64), &[]).await;
    assert_eq!(code, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_requests_in_flight_then_exits() {
    let mut svc = Svc::start(&[
        "--drain-ms",
        "20000",
        "--drain-delay-ms",
        "60000",
        "--preprocess-workers",
        "2",
    ]);
    let a = svc.addr();
    let inflight = svc.spawn_held("go");
    svc.wait_metric("stateful_pool_server_in_flight ", 1.0)
        .await;
    stateful_pool_http::sys::terminate_pid(svc.inst.pid());
    // Draining: the health check fails at once, requests are still served during the delay.
    let deadline = Instant::now() + T;
    while svc.get("/healthz").await.0 != 503 {
        assert!(Instant::now() < deadline, "/healthz never failed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (code, _, body) = svc.get("/healthz").await;
    assert_eq!((code, &body[..]), (503, &b"draining\n"[..]));
    let (code, _, _) = svc.post(samples::png(1, 64), &[]).await;
    assert_eq!(code, 200, "a request during the drain delay");
    // A second SIGTERM ends the delay: the listener closes, the held request is let go.
    stateful_pool_http::sys::terminate_pid(svc.inst.pid());
    svc.release("go");
    let (code, _, body) = inflight.await.unwrap().unwrap();
    assert_eq!(code, 200, "{body:?}");
    let status = tokio::task::spawn_blocking(move || {
        let st = svc.inst.wait(Duration::from_secs(120));
        (st, svc.inst.output())
    })
    .await
    .unwrap();
    let (st, out) = status;
    assert!(st.unwrap().success(), "{out}");
    assert!(out.contains("SIGTERM: draining"), "{out}");
    assert!(out.contains("connections drained"), "{out}");
    assert!(TcpStream::connect(a).is_err(), "still listening after exit");
}

/// A service whose stdout reader went away (a log collector restarted) still drains and
/// exits 0 at SIGTERM: its log lines are dropped, never a panic.
#[test]
fn sigterm_with_stdout_gone_still_exits_zero() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let mut child = Command::new(PROGRAM)
        .args(SMALL)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the service starts");
    {
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        while !line.starts_with("listening on") {
            line.clear();
            assert!(out.read_line(&mut line).unwrap() > 0, "no 'listening' line");
        }
    } // the read end closes here: every later line hits a broken pipe
    stateful_pool_http::sys::terminate_pid(child.id());
    let status = stateful_pool_http::instance::wait_or_kill(&mut child, T).unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");
}

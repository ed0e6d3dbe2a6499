//! The scale-out scenario, short: two service instances behind HAProxy on the loopback, one
//! SIGKILLed under load and restarted (the `scaleout` program; its own checks decide).
//! Skips with a visible message only when haproxy is not installed.

use std::process::Command;

#[test]
fn haproxy_routes_around_a_killed_instance_and_back() {
    let Some(haproxy) = stateful_pool_http::haproxy::find() else {
        println!(
            "SKIPPED: haproxy is not installed (apt-get install haproxy); the scale-out scenario did not run"
        );
        return;
    };
    let out = Command::new(env!("CARGO_BIN_EXE_scaleout"))
        .args([
            "--service",
            env!("CARGO_BIN_EXE_stateful-pool-http"),
            "--haproxy",
            haproxy.to_str().unwrap(),
            "--duration-s",
            "6",
            "--connections",
            "12",
            "--capacity",
            "4",
            "--image-size",
            "8",
            "--hidden",
            "16",
        ])
        .output()
        .expect("the scaleout program runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(out.status.success(), "the scenario failed:\n{text}");
    for check in [
        "[ok] HAProxy marked s0 down after its kill",
        "[ok] HAProxy marked s0 up after its restart",
        "[ok] HAProxy routed requests to s0 again",
        "[ok] only requests in flight on s0 failed",
        "[ok] every instance served requests",
    ] {
        assert!(text.contains(check), "missing {check:?}:\n{text}");
    }
}

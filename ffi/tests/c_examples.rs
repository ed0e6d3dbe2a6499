//! Compiles the C and C++ examples in `ffi/examples/` with the system compilers against the
//! library cargo just built (the static and the shared one), runs them, and checks their output.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// `target/<profile>`: where cargo put `libstateful_pool_ffi.{a,so}` and the examples.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf() // .../deps/<test> -> .../<profile>
}

fn ffi_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn out_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
}

/// Runs a command to completion within `secs` (killed and failed past it).
fn run(mut cmd: Command, secs: u64) -> Output {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{what} did not finish within {secs} s\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{what} failed ({})\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Builds the C libraries and the Rust worker example with cargo, once per test run: `cargo
/// test` builds the library only as an rlib for its tests, and no examples when a single test
/// is selected. Cargo's lock is free while tests run, and the target directory is the same.
fn ensure_built() {
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| {
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args([
            "build",
            "-p",
            "stateful-pool-ffi",
            "--lib",
            "--example",
            "rust_worker",
        ]);
        if target_dir().ends_with("release") {
            cmd.arg("--release");
        }
        run(cmd, 900);
    });
}

fn lib(name: &str) -> PathBuf {
    ensure_built();
    let p = target_dir().join(name);
    assert!(p.exists(), "{} was not built", p.display());
    p
}

/// The system libraries a program linked to the static library needs
/// (`rustc --print native-static-libs`).
const STATIC_LIBS: [&str; 6] = ["-lgcc_s", "-lutil", "-lrt", "-lpthread", "-lm", "-ldl"];

/// Compiles `source` into `out_dir()/<name>` with `extra` flags, linked statically or to the
/// shared library.
fn compile_with(
    compiler: &str,
    std: &str,
    source: &str,
    name: &str,
    link_static: bool,
    extra: &[&str],
) -> PathBuf {
    let out = out_dir().join(name);
    let mut cmd = Command::new(compiler);
    cmd.arg(format!("-std={std}"))
        .args(["-Wall", "-Wextra", "-Werror", "-pedantic", "-g"])
        .args(extra)
        .arg("-I")
        .arg(ffi_dir().join("include"))
        .arg(ffi_dir().join("examples").join(source))
        .arg("-o")
        .arg(&out);
    if link_static {
        cmd.arg(lib("libstateful_pool_ffi.a")).args(STATIC_LIBS);
    } else {
        let _ = lib("libstateful_pool_ffi.so");
        cmd.arg("-L")
            .arg(target_dir())
            .arg("-lstateful_pool_ffi")
            .arg(format!("-Wl,-rpath,{}", target_dir().display()))
            .arg("-lpthread");
    }
    run(cmd, 300);
    out
}

fn compile(compiler: &str, std: &str, source: &str, name: &str, link_static: bool) -> PathBuf {
    compile_with(compiler, std, source, name, link_static, &[])
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn a_c_host_with_c_workers_runs_the_square_example() {
    let exe = compile("cc", "c11", "square.c", "square", true);
    let out = stdout(&run(Command::new(&exe), 120));
    assert!(out.contains("Worker 0 initialized on GPU: [0, 1]"), "{out}");
    assert!(out.contains("Worker 1 initialized on GPU: [2, 3]"), "{out}");
    assert!(out.contains("Square of 100 is 10000 (GPU ["), "{out}");
    for i in 0..8 {
        assert!(
            out.contains(&format!("Square of {i} is {} (GPU [", i * i)),
            "{out}"
        );
    }
    assert!(
        out.contains("bad task: SP_TASK_FAILED: worker ")
            && out.contains("task failed: a task must be an 8-byte integer"),
        "{out}"
    );
    assert!(out.trim_end().ends_with("done"), "{out}");
}

#[test]
fn the_square_example_is_clean_under_address_and_undefined_behaviour_sanitizers() {
    // The C program (and its worker processes, the same binary) built with ASan, UBSan and
    // LeakSanitizer, linked to the static library.
    let out = compile_with(
        "cc",
        "c11",
        "square.c",
        "square_asan",
        true,
        &[
            "-fsanitize=address,undefined",
            "-fno-omit-frame-pointer",
            "-fno-sanitize-recover=all",
        ],
    );
    let mut cmd = Command::new(&out);
    cmd.env(
        "ASAN_OPTIONS",
        "detect_leaks=1:abort_on_error=0:exitcode=23",
    );
    let o = run(cmd, 120);
    let text = format!("{}{}", stdout(&o), String::from_utf8_lossy(&o.stderr));
    assert!(
        !text.contains("Sanitizer") && !text.contains("runtime error"),
        "{text}"
    );
    assert!(text.trim_end().ends_with("done"), "{text}");
}

#[test]
fn a_cpp_host_uses_the_raii_wrappers() {
    let exe = compile("c++", "c++17", "host.cpp", "host_cpp", false);
    let out = stdout(&run(Command::new(&exe), 120));
    for line in [
        "spawned: ada ready on seat 0",
        "spawned: grace ready on seat 1",
        "threads: 200 of 200 echoes correct",
        "payload sum: 3145722 (correct)",
        "error: SP_TASK_FAILED: worker ",
        "cannot do \"fly\"",
        "exception in the worker: SP_TASK_FAILED",
        "after 1 ms: still running",
        "then: slept",
        "a wait of seconds::max(): slept",
        "moved-from pool: SP_NULL_ARGUMENT: null pool handle",
        "done",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
}

/// The Rust worker program the C host drives (`examples/rust_worker.rs`).
fn rust_worker() -> PathBuf {
    ensure_built();
    let p = target_dir().join("examples").join("rust_worker");
    assert!(p.exists(), "{} was not built", p.display());
    p
}

#[test]
fn a_c_host_drives_workers_written_in_rust() {
    let exe = compile(
        "cc",
        "c11",
        "drive_rust_worker.c",
        "drive_rust_worker",
        false,
    );
    let mut cmd = Command::new(&exe);
    cmd.arg(rust_worker());
    let out = stdout(&run(cmd, 120));
    for line in [
        "spawned: rust worker alpha ready (seat 0)",
        "spawned: rust worker beta ready (seat 1)",
        "upper: HELLO FROM C",
        "100 of 100 results correct",
        "empty task: SP_TASK_FAILED: worker ",
        "got an empty task",
        "done",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
}

#[test]
fn the_headers_compile_in_each_language_mode() {
    // Each language mode a host might use includes the header cleanly.
    let src = out_dir().join("include_only.c");
    std::fs::write(
        &src,
        "#include \"stateful_pool.h\"\nint main(void) { return sp_status_name(0)[0] == 'S' ? 0 : 1; }\n",
    )
    .unwrap();
    for (compiler, std) in [
        ("cc", "c99"),
        ("cc", "c11"),
        ("c++", "c++11"),
        ("c++", "c++17"),
    ] {
        let mut cmd = Command::new(compiler);
        cmd.arg(format!("-std={std}"))
            .args(["-Wall", "-Wextra", "-Werror", "-fsyntax-only", "-I"])
            .arg(ffi_dir().join("include"));
        if compiler == "c++" {
            cmd.args(["-x", "c++"]);
        }
        cmd.arg(&src);
        run(cmd, 120);
    }
    let hpp = out_dir().join("include_hpp.cpp");
    std::fs::write(
        &hpp,
        "#include \"stateful_pool.hpp\"\nint main() { return 0; }\n",
    )
    .unwrap();
    let mut cmd = Command::new("c++");
    cmd.args([
        "-std=c++17",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-pedantic",
        "-fsyntax-only",
        "-I",
    ])
    .arg(ffi_dir().join("include"))
    .arg(&hpp);
    run(cmd, 120);
    assert!(Path::new(&src).exists());
}

#[test]
fn a_c_event_loop_drives_many_tasks_through_a_completion_queue() {
    let exe = compile("cc", "c11", "event_loop.c", "event_loop", true);
    let out = stdout(&run(Command::new(&exe), 120));
    assert!(
        out.contains("event loop: 1000 of 1000 results correct"),
        "{out}"
    );
    assert!(out.trim_end().ends_with("done"), "{out}");
}

#[test]
fn sp_init_with_a_null_callback_never_returns_in_a_worker() {
    // A test program, not an example: `compile` looks in `examples/`.
    let exe = compile(
        "cc",
        "c11",
        "../tests/c/init_null_callbacks.c",
        "init_null",
        true,
    );
    let out = stdout(&run(Command::new(&exe), 120));
    assert!(!out.contains("host main ran in a worker"), "{out}");
    assert!(out.contains("sp_init: SP_NULL_ARGUMENT"), "{out}");
    let spawn = out.lines().find(|l| l.starts_with("spawn:")).unwrap_or("");
    assert!(
        spawn.starts_with("spawn: SP_SPAWN_FAILED") && spawn.contains("callbacks->execute NULL"),
        "the worker's spawn step says why: {out}"
    );
}

#[test]
fn a_cpp_worker_class_whose_exceptions_become_errors() {
    let exe = compile("c++", "c++17", "cpp_worker.cpp", "cpp_worker", false);
    let out = stdout(&run(Command::new(&exe), 120));
    for line in [
        "spawned: ada on seat 0",
        "spawned: bob on seat 1",
        "spawn error: SP_SPAWN_FAILED: ",
        "this worker refuses to start",
        "execute: HELLO",
        "throw: SP_TASK_FAILED: ",
        "boom from C++",
        "throw-int: SP_TASK_FAILED: ",
        "unknown C++ exception",
        "poison: SP_POISONED: ",
        "device lost",
        "batch[0]: SP_OK A",
        "batch[1]: SP_TASK_FAILED ",
        "batch[2]: SP_OK C",
        "broadcast: 2 workers answered",
        "completion: 7 -> QUEUED",
        "done",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
}

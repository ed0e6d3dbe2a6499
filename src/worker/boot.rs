//! How a worker process starts: the parent executes a program (by default its own executable,
//! `/proc/self/exe`) with the segment's memfd as fd 3 and a boot string in the environment; the
//! child's `init()` recognises it, maps the segment and enters the worker's main loop, never
//! returning into the user's `main`.
//!
//! The entry point is `main_loop::run::<W>` for the pool's worker type `W`, passed as an offset
//! from an anchor function in this crate: the same executable file has the same offsets, whatever
//! ASLR did. Before jumping there the worker checks that it *is* the parent's executable file:
//! the boot string carries the parent's `/proc/self/exe` identity (device, inode, size, mtime),
//! which must equal the worker's own. A hash of `W`'s message types then catches a worker
//! speaking other messages. `serve::<W>()` enters `run::<W>` directly instead, for worker programs
//! that are other binaries.
//!
//! Whatever happens inside, a worker never unwinds back into the program that called `init()`:
//! [`enter`] holds a guard that aborts the process if anything unwinds through it.

use crate::shm::layout::{Layout, SegmentHeader, VERSION};
use crate::shm::segment::Segment;
use std::io;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::sync::OnceLock;

/// The environment variable carrying the boot string.
pub(crate) const BOOT_ENV: &str = "STATEFUL_POOL_WORKER";
/// The environment variable carrying a worker's GPU ids (`0,1`, or `visible:0,1` when its
/// `CUDA_VISIBLE_DEVICES` was restricted to them).
pub(crate) const GPUS_ENV: &str = "STATEFUL_POOL_GPUS";
/// The environment variable carrying a worker's CPU set (`0,1`), applied to the process
/// before its program starts (`process::launch`).
pub(crate) const CPUS_ENV: &str = "STATEFUL_POOL_CPUS";
/// The fd number the segment arrives on.
pub(crate) const SEGMENT_FD: i32 = 3;
/// The fd number of the worker's own notify line to the parent's supervisor
/// (`sys::notify_line`): the worker signals on it after reporting its spawn step's outcome (ready
/// or failed), which wakes the supervisor's `poll`.
pub(crate) const NOTIFY_FD: i32 = 4;

/// The boot string's format, after the protocol version (`v{VERSION}.{BOOT_FORMAT}:…`).
const BOOT_FORMAT: u32 = 3;

/// What the parent tells a worker process. Its encoding also carries the parent's executable
/// identity ([`ExeId::current`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Boot {
    pub(crate) seat: u32,
    pub(crate) parent_pid: u32,
    pub(crate) entry: usize,
    pub(crate) fingerprint: usize,
    /// Whether the worker reserves the memory of its seat's completion ring while its spawn
    /// step runs ([`RingReserve`]).
    pub(crate) reserve_ring: RingReserve,
}

/// What a starting worker does about the memory of its seat's completion ring (see
/// ARCHITECTURE.md, *Memory reservation*).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum RingReserve {
    /// Nothing: the pool does not reserve memory, or this seat's ring is already reserved.
    #[default]
    No,
    /// Reserve it (`fallocate`) on a thread of its own while the spawn step runs; report the
    /// spawn ready only once it is done, failed with `KIND_NO_SPACE` if it failed.
    Yes,
    /// As if the reservation failed with `ENOSPC` (the pool's test hook).
    FailForTest,
}

impl RingReserve {
    fn code(self) -> u8 {
        match self {
            RingReserve::No => 0,
            RingReserve::Yes => 1,
            RingReserve::FailForTest => 2,
        }
    }

    fn from_code(c: &str) -> Option<RingReserve> {
        Some(match c {
            "0" => RingReserve::No,
            "1" => RingReserve::Yes,
            "2" => RingReserve::FailForTest,
            _ => return None,
        })
    }
}

impl Boot {
    /// The boot string, with this process's executable identity.
    pub(crate) fn encode(&self) -> String {
        self.encode_with(ExeId::current())
    }

    fn encode_with(&self, exe: Option<ExeId>) -> String {
        let exe = exe.map_or_else(|| "-".to_string(), |e| e.encode());
        format!(
            "v{VERSION}.{BOOT_FORMAT}:{}:{}:{:x}:{:x}:{}:{exe}",
            self.seat,
            self.parent_pid,
            self.entry,
            self.fingerprint,
            self.reserve_ring.code()
        )
    }

    /// The boot fields and the parent's executable identity (`None`: the parent could not
    /// read its own), or `None` if `s` is malformed or of another format.
    pub(crate) fn decode(s: &str) -> Option<(Boot, Option<ExeId>)> {
        let mut it = s.split(':');
        if it.next()? != format!("v{VERSION}.{BOOT_FORMAT}") {
            return None;
        }
        let seat = it.next()?.parse().ok()?;
        let parent_pid = it.next()?.parse().ok()?;
        let entry = usize::from_str_radix(it.next()?, 16).ok()?;
        let fingerprint = usize::from_str_radix(it.next()?, 16).ok()?;
        let reserve_ring = RingReserve::from_code(it.next()?)?;
        let exe = match it.next()? {
            "-" => None,
            e => Some(ExeId::decode(e)?),
        };
        if it.next().is_some() {
            return None;
        }
        let boot = Boot {
            seat,
            parent_pid,
            entry,
            fingerprint,
            reserve_ring,
        };
        Some((boot, exe))
    }
}

/// The identity of an executable file: device, inode, size and modification time. Two
/// processes with equal identities run the same file, so their code has the same layout (a
/// file rewritten in place gets a new mtime; whoever resets it on purpose can write the binary
/// anyway).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ExeId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
}

impl ExeId {
    /// The identity of the executable this process runs (`/proc/self/exe` names the running
    /// file itself, even if its path was since replaced or removed).
    fn of_this_process() -> Option<ExeId> {
        let m = std::fs::metadata("/proc/self/exe").ok()?;
        Some(ExeId {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: m.mtime(),
            mtime_nsec: m.mtime_nsec(),
        })
    }

    /// This process's identity as the parent sends it: read at the first spawn and kept, so
    /// that every worker is compared with the same file.
    pub(crate) fn current() -> Option<ExeId> {
        static CURRENT: OnceLock<Option<ExeId>> = OnceLock::new();
        *CURRENT.get_or_init(ExeId::of_this_process)
    }

    fn encode(&self) -> String {
        format!(
            "{:x}.{:x}.{:x}.{}.{}",
            self.dev, self.ino, self.size, self.mtime, self.mtime_nsec
        )
    }

    fn decode(s: &str) -> Option<ExeId> {
        let mut it = s.split('.');
        let id = ExeId {
            dev: u64::from_str_radix(it.next()?, 16).ok()?,
            ino: u64::from_str_radix(it.next()?, 16).ok()?,
            size: u64::from_str_radix(it.next()?, 16).ok()?,
            mtime: it.next()?.parse().ok()?,
            mtime_nsec: it.next()?.parse().ok()?,
        };
        it.next().is_none().then_some(id)
    }
}

#[inline(never)]
fn anchor() -> usize {
    // Never called for its value; its address is the origin of the entry offsets. The body
    // is distinct so the linker cannot fold it into another function.
    std::hint::black_box(0x5f00_1a2c)
}

/// The fingerprint of this binary: the distance between two of our functions.
pub(crate) fn fingerprint() -> usize {
    (crate::init as fn() as usize).wrapping_sub(anchor as fn() -> usize as usize)
}

/// The offset that names `main_loop::run::<W>` in this binary.
pub(crate) fn entry_offset<W: crate::Worker>() -> usize {
    let f: fn(WorkerProcess) -> ! = super::main_loop::run::<W>;
    (f as usize).wrapping_sub(anchor as fn() -> usize as usize)
}

/// What a pool of `W` and its workers must agree on: the four message types (spawn
/// arguments, spawn output, task, output). A worker program serving other message types refuses
/// the segment; two worker types with the same messages (a C worker and a Rust worker both
/// speaking bytes) are interchangeable.
pub(crate) fn protocol_hash<W: crate::Worker>() -> u64 {
    type_hash::<(W::SpawnArgs, W::SpawnOutput, W::Task, W::Output)>()
}

/// FNV-1a of a type's name.
pub(crate) fn type_hash<W: 'static>() -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in std::any::type_name::<W>().bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A worker process's view of its pool: the mapped segment and who it is.
#[derive(Debug)]
pub(crate) struct WorkerProcess {
    pub(crate) seg: Segment,
    pub(crate) layout: Layout,
    pub(crate) seat: u32,
    pub(crate) notify: Option<OwnedFd>,
    /// The GPUs the worker was spawned with, and whether its CUDA view is restricted to them.
    pub(crate) gpus: (Vec<u32>, bool),
    /// The reservation of the seat's completion ring, running beside the spawn step (see
    /// [`RingReserve::Yes`]); joined before the worker reports ready.
    pub(crate) ring_reservation: Option<RingReservation>,
}

/// A completion ring's reservation: in progress on its own thread, or (when no thread could
/// be started) already done on the worker's main thread.
#[derive(Debug)]
pub(crate) enum RingReservation {
    /// Running beside the spawn step.
    Thread(std::thread::JoinHandle<io::Result<()>>),
    /// Done before the spawn step, with this outcome.
    Done(io::Result<()>),
}

impl RingReservation {
    /// Starts reserving `len` bytes at `off` of the segment behind `fd` (a close-on-exec
    /// duplicate this reservation owns and closes when done). The thread blocks every signal:
    /// the worker's handlers stay on its own threads, and `fallocate` is not interrupted. If
    /// the thread cannot be started, the reservation is made here and now instead.
    fn start(fd: OwnedFd, off: u64, len: u64, how: RingReserve) -> RingReservation {
        let reserve = move |fd: &OwnedFd| {
            if how == RingReserve::FailForTest {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            crate::sys::reserve_range(fd.as_fd(), off, len)
        };
        // Shared, so that the reservation can still be made here if no thread starts.
        let fd = std::sync::Arc::new(fd);
        let theirs = fd.clone();
        let builder = std::thread::Builder::new()
            .name("sp-reserve".into())
            .stack_size(64 << 10);
        match crate::sys::spawn_signals_blocked(builder, move || reserve(&theirs)) {
            Ok(h) => RingReservation::Thread(h),
            Err(_) => RingReservation::Done(reserve(&fd)),
        }
    }

    /// Waits for the reservation; its outcome.
    pub(crate) fn finish(self) -> io::Result<()> {
        match self {
            RingReservation::Thread(h) => h.join().unwrap_or_else(|_| {
                Err(io::Error::other(
                    "the ring reservation thread panicked (see the worker's stderr)",
                ))
            }),
            RingReservation::Done(r) => r,
        }
    }
}

/// Parses [`GPUS_ENV`].
pub(crate) fn parse_gpus(v: &str) -> Option<(Vec<u32>, bool)> {
    let (list, visible) = match v.strip_prefix("visible:") {
        Some(rest) => (rest, true),
        None => (v, false),
    };
    if list.is_empty() {
        return Some((Vec::new(), visible));
    }
    let ids = list
        .split(',')
        .map(|x| x.trim().parse().ok())
        .collect::<Option<Vec<u32>>>()?;
    Some((ids, visible))
}

impl WorkerProcess {
    pub(crate) fn header(&self) -> &SegmentHeader {
        self.seg.get::<SegmentHeader>(0)
    }

    /// Wakes the parent's supervisor (after a spawn-step report).
    pub(crate) fn notify_parent(&self) {
        if let Some(fd) = &self.notify {
            crate::sys::notify_line_signal(fd.as_fd());
        }
    }
}

/// Exit codes of a worker that cannot start; the parent names them in `SpawnError::Exited`.
pub(crate) mod exit_code {
    /// The boot string is malformed (another protocol version, or not from a pool).
    pub(crate) const BAD_BOOT: i32 = 120;
    /// The program is a different binary than the parent's and calls `init()` (a separate
    /// worker program must call `serve::<W>()`).
    pub(crate) const WRONG_BINARY: i32 = 121;
    /// The segment's header has another magic, protocol version or layout.
    pub(crate) const PROTOCOL_MISMATCH: i32 = 122;
    /// The segment could not be mapped.
    pub(crate) const NO_SEGMENT: i32 = 123;
    /// The program runs with elevated privileges (setuid, setgid or file capabilities:
    /// `AT_SECURE`), and refuses to take orders from its environment.
    pub(crate) const SECURE_EXEC: i32 = 124;
    /// The parent died before the worker started.
    pub(crate) const ORPHAN: i32 = 102;

    /// What an exit code of a worker that died during start-up means, if it is one of ours.
    pub(crate) fn meaning(code: i32) -> Option<&'static str> {
        Some(match code {
            BAD_BOOT => "malformed boot string: parent and worker speak different protocols",
            WRONG_BINARY => {
                "the worker program is a different binary than the parent; a separate worker \
                 program must call stateful_pool::serve::<W>(), not init()"
            }
            PROTOCOL_MISMATCH => {
                "protocol mismatch: the segment header has another magic, version or layout"
            }
            NO_SEGMENT => "the worker could not map the pool's segment",
            SECURE_EXEC => {
                "the worker program runs with elevated privileges (setuid, setgid or \
                 capabilities) and refuses to be a worker"
            }
            ORPHAN => "the parent died before the worker started",
            _ => return None,
        })
    }
}

fn die(code: i32, msg: &str) -> ! {
    eprintln!("stateful-pool worker: {msg}");
    std::process::exit(code)
}

/// Aborts the process if dropped, i.e. if anything unwinds out of the worker (rayon's
/// `AbortIfPanic`). A worker process must never return into the code that called `init()`,
/// `serve()` or `sp_init`: that is the user's `main`, which would go on as a second host. Every
/// normal way out of a worker ends in `std::process::exit`, which runs no destructors, so the
/// guard is never dropped on them.
struct AbortOnUnwind;

impl Drop for AbortOnUnwind {
    fn drop(&mut self) {
        eprintln!("stateful-pool worker: a panic unwound out of the worker loop; aborting");
        std::process::abort()
    }
}

/// Which worker loop a starting worker process enters.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Entry {
    /// The one the boot string names (an offset in this binary; `init()`).
    Named,
    /// This one (`serve::<W>()`): the program itself says what it serves, so it may be another
    /// binary than the parent's; the segment's message-type hash is still checked.
    Direct(fn(WorkerProcess) -> !),
}

/// The worker side of `init()` and `serve()`: called when [`BOOT_ENV`] is set. Never returns,
/// not even by unwinding (it aborts instead).
pub(crate) fn enter(boot_str: &str, which: Entry) -> ! {
    let _abort_on_unwind = AbortOnUnwind;
    // A setuid, setgid or file-capability program must not take orders (a code offset, a
    // segment, tasks) from an environment that a less privileged user controls.
    // SAFETY: getauxval has no preconditions; it reads the process's auxiliary vector.
    if unsafe { libc::getauxval(libc::AT_SECURE) } != 0 {
        die(
            exit_code::SECURE_EXEC,
            &format!(
                "{BOOT_ENV} is set, but this program runs with elevated privileges \
                 (setuid, setgid or file capabilities): refusing to be a pool worker"
            ),
        )
    }
    let Some((boot, parent_exe)) = Boot::decode(boot_str) else {
        die(
            exit_code::BAD_BOOT,
            &format!(
                "malformed {BOOT_ENV}={boot_str:?} (format v{VERSION}.{BOOT_FORMAT} expected)"
            ),
        )
    };
    // Fate-share with the parent: SIGKILL when the thread that launched us (the pool's
    // supervisor) exits. Set here, after the exec (the `posix_spawn` launcher has no step
    // between fork and exec); the parent may have died before it, so check the parent pid
    // after setting it.
    // SAFETY: prctl with PR_SET_PDEATHSIG takes integers only.
    unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    // SAFETY: getppid has no preconditions.
    if unsafe { libc::getppid() } as u32 != boot.parent_pid {
        std::process::exit(exit_code::ORPHAN);
    }
    if matches!(which, Entry::Named) {
        // `init()` jumps to an offset computed in the parent's executable: only sound if this
        // process runs that very file.
        let this_exe = ExeId::of_this_process();
        if parent_exe.is_none() || this_exe != parent_exe || boot.fingerprint != fingerprint() {
            die(
                exit_code::WRONG_BINARY,
                "launched by a pool of a different binary than this one, and this program \
                 calls stateful_pool::init(), which serves only pools of its own executable; a \
                 separate worker program must call stateful_pool::serve::<W>() instead",
            )
        }
    }
    // SAFETY: fd 3 was placed by the parent's launcher for us and nothing else in this process
    // owns it (init() runs before the program opens files).
    let fd = unsafe { OwnedFd::from_raw_fd(SEGMENT_FD) };
    // The reservation needs the file; everything else the mapping. A close-on-exec copy, so
    // that no program the worker starts inherits it while the reservation runs, numbered above
    // the notify line's fd 4 (which may be absent here and is looked for below).
    let reserve_fd = match boot.reserve_ring {
        RingReserve::No => None,
        _ => match crate::sys::dup_cloexec_from(fd.as_fd(), NOTIFY_FD + 1) {
            Ok(f) => Some(f),
            Err(e) => die(
                exit_code::NO_SEGMENT,
                &format!("cannot duplicate the pool segment's fd {SEGMENT_FD}: {e}"),
            ),
        },
    };
    // Maps the segment and closes fd 3: programs the worker's code starts never inherit it.
    let seg = match Segment::open(fd) {
        Ok(s) => s,
        Err(e) => die(
            exit_code::NO_SEGMENT,
            &format!("cannot map the pool segment on fd {SEGMENT_FD}: {e}"),
        ),
    };
    if seg.len() < size_of::<SegmentHeader>() {
        die(
            exit_code::PROTOCOL_MISMATCH,
            "pool segment too small for a header",
        )
    }
    let hdr = seg.get::<SegmentHeader>(0);
    let layout = match hdr.check(seg.len()) {
        Ok(l) => l,
        Err(e) => die(exit_code::PROTOCOL_MISMATCH, &e.to_string()),
    };
    if boot.seat >= hdr.params.max_workers {
        die(exit_code::BAD_BOOT, "seat index out of range")
    }
    // SAFETY: fd 4, when valid, was placed by the launcher for us alone (the check is fcntl).
    let notify = (unsafe { libc::fcntl(NOTIFY_FD, libc::F_GETFD) } >= 0).then(|| {
        // Keep it out of any process the worker's own code starts.
        // SAFETY: NOTIFY_FD is open (checked above) and owned by nothing else here.
        unsafe { libc::fcntl(NOTIFY_FD, libc::F_SETFD, libc::FD_CLOEXEC) };
        // SAFETY: as above; this is its only owner.
        unsafe { OwnedFd::from_raw_fd(NOTIFY_FD) }
    });
    let entry: fn(WorkerProcess) -> ! = match which {
        Entry::Direct(f) => f,
        Entry::Named => {
            let entry_addr = (anchor as fn() -> usize as usize).wrapping_add(boot.entry);
            // SAFETY: this process runs the parent's executable file (same device, inode, size
            // and mtime, checked above), so its code has the parent's layout, relative to
            // `anchor` whatever ASLR did; and the parent computed `boot.entry` with
            // `entry_offset::<W>()`, the offset of `main_loop::run::<W>` from `anchor`. So
            // `entry_addr` is that function, of exactly this signature. The boot string is
            // trusted as the parent's: whoever sets our environment could preload code into us
            // anyway, except across a privilege boundary, which is refused above (AT_SECURE).
            unsafe { std::mem::transmute::<usize, fn(WorkerProcess) -> !>(entry_addr) }
        }
    };
    let gpus = match std::env::var(GPUS_ENV) {
        Ok(v) => match parse_gpus(&v) {
            Some(g) => g,
            None => die(exit_code::BAD_BOOT, &format!("malformed {GPUS_ENV}={v:?}")),
        },
        Err(_) => (Vec::new(), false),
    };
    // SAFETY: as for the boot variable in `init`: still the start of the process, which the
    // caller guarantees has a single thread. Removed so that pools this worker builds do not
    // hand it on.
    unsafe { std::env::remove_var(GPUS_ENV) };
    // From here on the process may have threads. The seat's ring is reserved beside the spawn
    // step (which may take seconds loading a model), not before it: off the start-up path.
    let ring_reservation = reserve_fd.map(|fd| {
        let (off, len) = (
            layout.result_ring_off(boot.seat) as u64,
            layout.result_ring_stride as u64,
        );
        RingReservation::start(fd, off, len, boot.reserve_ring)
    });
    entry(WorkerProcess {
        seg,
        layout,
        seat: boot.seat,
        notify,
        gpus,
        ring_reservation,
    })
}

#[cfg(all(test, not(stateful_pool_loom)))]
mod tests {
    use super::*;

    #[test]
    fn boot_string_roundtrips_and_rejects_garbage() {
        let b = Boot {
            seat: 3,
            parent_pid: 1234,
            entry: 0xdead_beef,
            fingerprint: usize::MAX - 5,
            reserve_ring: RingReserve::Yes,
        };
        let exe = ExeId {
            dev: 0x803,
            ino: 1 << 40,
            size: 12_345_678,
            mtime: -5,
            mtime_nsec: 999_999_999,
        };
        assert_eq!(
            Boot::decode(&b.encode_with(Some(exe))),
            Some((b.clone(), Some(exe)))
        );
        assert_eq!(Boot::decode(&b.encode_with(None)), Some((b.clone(), None)));
        // What a parent sends names the running executable.
        assert_eq!(
            Boot::decode(&b.encode()),
            Some((b, ExeId::of_this_process()))
        );
        let v = format!("v{VERSION}.{BOOT_FORMAT}");
        assert_eq!(
            Boot::decode(&format!("{v}:1:2:3:4:0:-")).map(|d| d.0.seat),
            Some(1)
        );
        assert_eq!(
            Boot::decode(&format!("{v}:1:2:3:4:2:-")).map(|d| d.0.reserve_ring),
            Some(RingReserve::FailForTest)
        );
        assert_eq!(Boot::decode(&format!("v{VERSION}:1:2:3:4")), None); // the old format
        assert_eq!(Boot::decode(&format!("v{VERSION}.2:1:2:3:4:-")), None); // no reserve field
        assert_eq!(Boot::decode(&format!("{v}:1:2:3:4:0")), None);
        assert_eq!(Boot::decode(&format!("{v}:1:2:3:4:0:-:5")), None);
        assert_eq!(Boot::decode(&format!("{v}:1:2:3:4:3:-")), None);
        assert_eq!(Boot::decode(&format!("{v}:1:2:3:4:0:1.2.3.4")), None);
        assert_eq!(Boot::decode(&format!("{v}:x:2:3:4:0:-")), None);
        assert_eq!(Boot::decode(""), None);
    }

    #[test]
    fn exit_codes_are_explained() {
        assert!(
            exit_code::meaning(exit_code::WRONG_BINARY)
                .unwrap()
                .contains("serve::<W>()")
        );
        assert!(exit_code::meaning(exit_code::SECURE_EXEC).is_some());
        assert!(exit_code::meaning(1).is_none());
    }

    #[test]
    fn gpu_lists_parse() {
        assert_eq!(parse_gpus("0,1"), Some((vec![0, 1], false)));
        assert_eq!(parse_gpus("visible:3"), Some((vec![3], true)));
        assert_eq!(parse_gpus(""), Some((vec![], false)));
        assert_eq!(parse_gpus("0,x"), None);
        let o = crate::SpawnOptions::new()
            .gpus([2, 5])
            .visible_devices_only(true);
        let env = o.process_env();
        assert!(env.contains(&(GPUS_ENV.to_string(), "visible:2,5".to_string())));
        assert!(env.contains(&("CUDA_VISIBLE_DEVICES".to_string(), "2,5".to_string())));
    }

    #[test]
    fn type_hash_tells_types_apart() {
        assert_ne!(type_hash::<u32>(), type_hash::<u64>());
        assert_eq!(type_hash::<String>(), type_hash::<String>());
    }
}

//! Handle tables: what a C host holds is a number, never a pointer into Rust memory, so a null,
//! stale, forged or double-freed handle is an error code instead of undefined behaviour.
//!
//! A handle is `kind (8 bits) | generation (24 bits) | shard (4 bits) | index + 1 (28 bits)`.
//! The kind tells a task handle from a result handle; the generation changes every time a slot
//! is freed, so an old handle to a reused slot no longer matches. An entry can be *checked out*
//! (busy) while a thread works on it outside the table's lock (a blocking wait); a second thread
//! using the same handle meanwhile gets `SP_BUSY`.
//!
//! **Sharding.** A table is [`SHARDS`] independent shards, each with its own lock, slots and
//! free list (on its own cache lines). A thread inserts into "its" shard (assigned round-robin
//! the first time the thread inserts), and the shard is part of the handle, so every later use
//! of the handle, from any thread, goes straight to that shard. Threads submitting and waiting
//! on their own tasks therefore never contend on one process-wide lock; two threads share a
//! shard only when there are more threads than shards, and then only for the few instructions
//! a table operation holds the lock.
//!
//! After a `fork()` of a process that created a pool, every handle is dead in the child (see
//! [`watch_forks`]): the child shares the pools' segments with the parent but has private copies
//! of their free lists and arenas, and none of their threads, so using them would hand the same
//! slots to two processes.

use crate::{Fail, sp_status};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Set in the child of a `fork()` once this process has created a pool.
static FORKED_CHILD: AtomicBool = AtomicBool::new(false);

extern "C" fn mark_forked_child() {
    // Async-signal-safe: one atomic store.
    FORKED_CHILD.store(true, Ordering::Relaxed);
}

/// Registers (once) the `pthread_atfork` child handler that makes every handle of this
/// process dead in a forked child; called before a pool is created.
pub(crate) fn watch_forks() -> Result<(), Fail> {
    static REGISTERED: std::sync::OnceLock<i32> = std::sync::OnceLock::new();
    // SAFETY: registers a child handler that only stores to an atomic (async-signal-safe, as a
    // handler running in the child of a multi-threaded fork must be); no prepare/parent ones.
    let rc = *REGISTERED
        .get_or_init(|| unsafe { libc::pthread_atfork(None, None, Some(mark_forked_child)) });
    if rc != 0 {
        return Err(Fail::new(
            sp_status::SP_BUILD_FAILED,
            format!("pthread_atfork failed (error {rc})"),
        ));
    }
    Ok(())
}

/// `SP_SHUTDOWN` in the child of a `fork()` of a process that created a pool: its pools, and
/// their tasks, results and loans, belong to the parent, and this process makes no new ones
/// (exec a program to use the library again). Checked before any table lock, which another
/// thread of the parent may have held at the fork.
pub(crate) fn check_not_forked() -> Result<(), Fail> {
    if FORKED_CHILD.load(Ordering::Relaxed) {
        return Err(Fail::new(
            sp_status::SP_SHUTDOWN,
            "this process is a fork() of the one that created the pool: its pools, tasks, \
             results and loans are unusable here, and no new pool can be made (exec a program \
             to use stateful-pool)",
        ));
    }
    Ok(())
}

enum Slot<T> {
    Free { generation: u32 },
    Live { generation: u32, value: T },
    Busy { generation: u32 },
}

impl<T> Slot<T> {
    fn generation(&self) -> u32 {
        match *self {
            Slot::Free { generation }
            | Slot::Live { generation, .. }
            | Slot::Busy { generation } => generation,
        }
    }
}

struct Inner<T> {
    slots: Vec<Slot<T>>,
    /// Free indices, reused oldest first (FIFO), so a stale handle's index comes back as late
    /// as possible; an index whose generations are used up is never reused at all.
    free: std::collections::VecDeque<u32>,
}

impl<T> Inner<T> {
    /// Puts index `i` (just freed, now at `generation`) back for reuse, unless its generations
    /// wrapped: then a stale handle could become valid again, so the index is retired for good.
    fn recycle(&mut self, i: usize, generation: u32) {
        if generation != FIRST_GENERATION {
            self.free.push_back(i as u32);
        }
    }
}

/// One shard: its own lock, slots and free list, alone on its cache lines (so two threads
/// working in two shards do not bounce one line between their cores).
#[repr(align(128))]
struct Shard<T> {
    inner: Mutex<Inner<T>>,
}

impl<T> Shard<T> {
    const fn new() -> Self {
        Shard {
            inner: Mutex::new(Inner {
                slots: Vec::new(),
                free: std::collections::VecDeque::new(),
            }),
        }
    }
}

/// Number of shards of every table (a power of two; the shard is 4 bits of the handle).
pub(crate) const SHARDS: usize = 16;
const SHARD_SHIFT: u32 = 28;
/// The handle's low 32 bits below the shard: the index within the shard, plus one.
const INDEX_MASK: u32 = (1 << SHARD_SHIFT) - 1;

/// The shard this thread inserts into: assigned round-robin on first use, so the first
/// [`SHARDS`] threads that make handles each get a shard of their own.
fn this_threads_shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static MINE: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    // During thread-local teardown (a C destructor freeing handles), any shard will do.
    MINE.try_with(|s| *s).unwrap_or(0)
}

/// A table of live objects of one kind, in [`SHARDS`] shards.
pub(crate) struct Table<T> {
    kind: u8,
    name: &'static str,
    shards: [Shard<T>; SHARDS],
}

const GEN_MASK: u32 = (1 << 24) - 1;

impl<T> Table<T> {
    pub(crate) const fn new(kind: u8, name: &'static str) -> Self {
        Table {
            kind,
            name,
            shards: [const { Shard::new() }; SHARDS],
        }
    }

    fn lock(&self, shard: usize) -> std::sync::MutexGuard<'_, Inner<T>> {
        self.shards[shard]
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn encode(&self, shard: usize, index: usize, generation: u32) -> u64 {
        (u64::from(self.kind) << 56)
            | (u64::from(generation & GEN_MASK) << 32)
            | ((shard as u64) << SHARD_SHIFT)
            | (index as u64 + 1)
    }

    /// The shard, slot index and generation a handle names, if it is one of this table's.
    fn decode(&self, h: u64) -> Result<(usize, usize, u32), Fail> {
        check_not_forked()?;
        if h == 0 {
            return Err(Fail::new(
                sp_status::SP_NULL_ARGUMENT,
                format!("null {} handle", self.name),
            ));
        }
        let low = (h & 0xffff_ffff) as u32;
        let index = low & INDEX_MASK;
        if (h >> 56) as u8 != self.kind || index == 0 {
            return Err(self.invalid(h));
        }
        let shard = (low >> SHARD_SHIFT) as usize;
        Ok((shard, (index - 1) as usize, ((h >> 32) as u32) & GEN_MASK))
    }

    fn invalid(&self, h: u64) -> Fail {
        Fail::new(
            sp_status::SP_INVALID_HANDLE,
            format!(
                "{h:#x} is not a live {} handle (never issued, already freed, or of another kind)",
                self.name
            ),
        )
    }

    /// Stores `value` in this thread's shard; returns its handle.
    pub(crate) fn insert(&self, value: T) -> u64 {
        let shard = this_threads_shard();
        let mut t = self.lock(shard);
        if let Some(i) = t.free.pop_front() {
            let generation = t.slots[i as usize].generation();
            t.slots[i as usize] = Slot::Live { generation, value };
            return self.encode(shard, i as usize, generation);
        }
        let i = t.slots.len();
        assert!(
            i < INDEX_MASK as usize,
            "more than 2^28 live {} handles in one shard",
            self.name
        );
        t.slots.push(Slot::Live {
            generation: FIRST_GENERATION,
            value,
        });
        self.encode(shard, i, FIRST_GENERATION)
    }

    /// Runs `f` on the live value (under its shard's lock: keep it short).
    pub(crate) fn with<R>(&self, h: u64, f: impl FnOnce(&mut T) -> R) -> Result<R, Fail> {
        let (s, i, g) = self.decode(h)?;
        let mut t = self.lock(s);
        match t.slots.get_mut(i) {
            Some(Slot::Live { generation, value }) if *generation == g => Ok(f(value)),
            Some(Slot::Busy { generation }) if *generation == g => Err(self.busy()),
            _ => Err(self.invalid(h)),
        }
    }

    fn busy(&self) -> Fail {
        Fail::new(
            sp_status::SP_BUSY,
            format!("the {} handle is in use by another thread", self.name),
        )
    }

    /// Replaces the live value of handle `h` with `next(generation)`; returns the value.
    fn take_live(&self, h: u64, next: impl FnOnce(u32) -> Slot<T>) -> Result<T, Fail> {
        let (s, i, g) = self.decode(h)?;
        let mut t = self.lock(s);
        match t.slots.get(i) {
            Some(Slot::Live { generation, .. }) if *generation == g => {}
            Some(Slot::Busy { generation }) if *generation == g => return Err(self.busy()),
            _ => return Err(self.invalid(h)),
        }
        let next = next(g);
        let freed = match next {
            Slot::Free { generation } => Some(generation),
            _ => None,
        };
        let Slot::Live { value, .. } = std::mem::replace(&mut t.slots[i], next) else {
            unreachable!("checked live above");
        };
        if let Some(generation) = freed {
            t.recycle(i, generation);
        }
        Ok(value)
    }

    /// Removes the value; the handle is dead from now on.
    pub(crate) fn remove(&self, h: u64) -> Result<T, Fail> {
        self.take_live(h, |g| Slot::Free {
            generation: next_generation(g),
        })
    }

    /// Takes the value out while keeping the handle reserved (busy): finish with
    /// [`put_back`](Self::put_back) (the handle lives on) or [`retire`](Self::retire).
    pub(crate) fn check_out(&self, h: u64) -> Result<T, Fail> {
        self.take_live(h, |g| Slot::Busy { generation: g })
    }

    /// Returns a checked-out value under its handle.
    pub(crate) fn put_back(&self, h: u64, value: T) {
        let Ok((s, i, g)) = self.decode(h) else {
            return;
        };
        let mut t = self.lock(s);
        if let Some(slot @ Slot::Busy { .. }) = t.slots.get_mut(i) {
            if slot.generation() == g {
                *slot = Slot::Live {
                    generation: g,
                    value,
                };
            }
        }
    }

    /// Ends a checked-out handle: it is dead from now on.
    pub(crate) fn retire(&self, h: u64) {
        let Ok((s, i, g)) = self.decode(h) else {
            return;
        };
        let mut t = self.lock(s);
        if let Some(slot @ Slot::Busy { .. }) = t.slots.get_mut(i) {
            if slot.generation() == g {
                let generation = next_generation(g);
                *slot = Slot::Free { generation };
                t.recycle(i, generation);
            }
        }
    }
}

/// The generation of a fresh index (0 is never issued, so an all-zero handle body never
/// matches).
const FIRST_GENERATION: u32 = 1;

fn next_generation(g: u32) -> u32 {
    match (g + 1) & GEN_MASK {
        0 => FIRST_GENERATION,
        n => n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_forged_and_foreign_handles_are_refused() {
        let a: Table<String> = Table::new(1, "thing");
        let b: Table<String> = Table::new(2, "other");
        let h = a.insert("x".into());
        assert_eq!(a.with(h, |v| v.clone()).unwrap(), "x");
        assert_eq!(
            b.with(h, |v| v.clone()).unwrap_err().status,
            sp_status::SP_INVALID_HANDLE
        );
        assert_eq!(
            a.with(0, |_| ()).unwrap_err().status,
            sp_status::SP_NULL_ARGUMENT
        );
        assert_eq!(
            a.with(h + 1, |_| ()).unwrap_err().status,
            sp_status::SP_INVALID_HANDLE
        );
        assert_eq!(a.remove(h).unwrap(), "x");
        // Double free, and use after free, even once the slot is reused.
        assert_eq!(
            a.remove(h).unwrap_err().status,
            sp_status::SP_INVALID_HANDLE
        );
        let h2 = a.insert("y".into());
        assert_ne!(h, h2);
        assert_eq!(
            a.with(h, |_| ()).unwrap_err().status,
            sp_status::SP_INVALID_HANDLE
        );
        assert_eq!(a.with(h2, |v| v.clone()).unwrap(), "y");
    }

    #[test]
    fn an_index_whose_generations_run_out_is_never_reused() {
        let a: Table<u32> = Table::new(1, "thing");
        let first = a.insert(0);
        a.remove(first).unwrap();
        // Cycle the one index through every generation (the audit's L4: a stale handle must
        // never come back to life).
        let mut last = 0;
        for k in 1..GEN_MASK {
            let h = a.insert(k);
            assert_eq!(h & 0xffff_ffff, first & 0xffff_ffff, "the same index, FIFO");
            a.remove(h).unwrap();
            last = h;
        }
        let fresh = a.insert(7);
        assert_ne!(fresh & 0xffff_ffff, first & 0xffff_ffff, "a new index");
        for h in [first, last] {
            assert_eq!(
                a.with(h, |_| ()).unwrap_err().status,
                sp_status::SP_INVALID_HANDLE
            );
        }
    }

    #[test]
    fn a_checked_out_handle_is_busy_until_put_back_or_retired() {
        let a: Table<u32> = Table::new(1, "thing");
        let h = a.insert(5);
        let v = a.check_out(h).unwrap();
        assert_eq!(a.with(h, |_| ()).unwrap_err().status, sp_status::SP_BUSY);
        assert_eq!(a.remove(h).unwrap_err().status, sp_status::SP_BUSY);
        a.put_back(h, v + 1);
        assert_eq!(a.with(h, |v| *v).unwrap(), 6);
        let _ = a.check_out(h).unwrap();
        a.retire(h);
        assert_eq!(
            a.with(h, |_| ()).unwrap_err().status,
            sp_status::SP_INVALID_HANDLE
        );
    }

    #[test]
    fn handles_from_many_threads_land_in_several_shards_and_work_from_any_thread() {
        let a: std::sync::Arc<Table<u32>> = std::sync::Arc::new(Table::new(1, "thing"));
        let hs: Vec<u64> = (0..SHARDS as u32 * 2)
            .map(|k| {
                let a = a.clone();
                std::thread::spawn(move || a.insert(k)).join().unwrap()
            })
            .collect();
        let shards: std::collections::BTreeSet<u64> =
            hs.iter().map(|h| (h >> SHARD_SHIFT) & 0xf).collect();
        assert!(shards.len() > 1, "all handles in one shard: {shards:?}");
        for (k, h) in hs.iter().enumerate() {
            // Used and freed from this thread, not the one that made it.
            assert_eq!(a.with(*h, |v| *v).unwrap(), k as u32);
            // The same index and generation in another shard is not this handle.
            let other = *h ^ (1 << SHARD_SHIFT);
            assert!(a.with(other, |v| *v).map_or(true, |v| v != k as u32));
            assert_eq!(a.remove(*h).unwrap(), k as u32);
            assert_eq!(
                a.remove(*h).unwrap_err().status,
                sp_status::SP_INVALID_HANDLE
            );
        }
        // A forged handle with a zero index in any shard.
        for s in 0..SHARDS as u64 {
            let forged = (1u64 << 56) | (1 << 32) | (s << SHARD_SHIFT);
            assert_eq!(
                a.with(forged, |_| ()).unwrap_err().status,
                sp_status::SP_INVALID_HANDLE
            );
        }
    }
}

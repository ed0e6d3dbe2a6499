//! The parent's allocator for the task arena: large task archives and loaned payload buffers.
//!
//! Only the parent allocates and frees (workers never do), so it is an ordinary first-fit free
//! list behind a parent-local mutex: no cross-process allocator to repair after a crash. Small
//! tasks never come here (they fit their slot's inline area).

use std::sync::{Condvar, Mutex};
use std::time::Instant;

/// Allocation granularity and alignment (a cache line; also satisfies rkyv's 16).
pub(crate) const ARENA_ALIGN: u64 = 64;

#[derive(Debug)]
pub(crate) struct Arena {
    /// Free blocks `(offset, len)`, sorted by offset, never adjacent (coalesced).
    free: Mutex<Vec<(u64, u64)>>,
    freed: Condvar,
    size: u64,
}

/// How long an allocation may wait for space.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Block {
    No,
    Until(Option<Instant>),
}

impl Arena {
    /// An arena of `size` bytes starting at segment offset `base` (64-aligned).
    pub(crate) fn new(base: u64, size: u64) -> Arena {
        let size = size / ARENA_ALIGN * ARENA_ALIGN;
        Arena {
            free: Mutex::new(if size > 0 { vec![(base, size)] } else { vec![] }),
            freed: Condvar::new(),
            size,
        }
    }

    /// Rounds a request up to the granularity.
    pub(crate) fn rounded(len: u64) -> u64 {
        len.max(1).div_ceil(ARENA_ALIGN) * ARENA_ALIGN
    }

    /// Allocates `len` bytes (rounded up); returns `(offset, rounded_len)`. `None` if there is no
    /// room (after waiting as `block` allows) or `len` exceeds the arena.
    pub(crate) fn alloc(
        &self,
        len: u64,
        block: Block,
        closing: impl Fn() -> bool,
    ) -> Option<(u64, u64)> {
        let want = Self::rounded(len);
        if want > self.size {
            return None;
        }
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(i) = free.iter().position(|&(_, l)| l >= want) {
                let (off, l) = free[i];
                if l == want {
                    free.remove(i);
                } else {
                    free[i] = (off + want, l - want);
                }
                return Some((off, want));
            }
            if closing() {
                return None;
            }
            match block {
                Block::No => return None,
                Block::Until(None) => {
                    free = self.freed.wait(free).unwrap_or_else(|e| e.into_inner());
                }
                Block::Until(Some(deadline)) => {
                    let left = deadline.checked_duration_since(Instant::now())?;
                    free = self
                        .freed
                        .wait_timeout(free, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
    }

    /// Returns a block from [`alloc`](Self::alloc).
    pub(crate) fn free(&self, off: u64, len: u64) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let i = free.partition_point(|&(o, _)| o < off);
        free.insert(i, (off, len));
        // Coalesce with the next, then the previous block.
        if i + 1 < free.len() && free[i].0 + free[i].1 == free[i + 1].0 {
            free[i].1 += free[i + 1].1;
            free.remove(i + 1);
        }
        if i > 0 && free[i - 1].0 + free[i - 1].1 == free[i].0 {
            free[i - 1].1 += free[i].1;
            free.remove(i);
        }
        drop(free);
        self.freed.notify_all();
    }

    /// Wakes every waiter (used at shutdown).
    pub(crate) fn wake_all(&self) {
        let _g = self.free.lock();
        self.freed.notify_all();
    }

    /// Total free bytes (for tests).
    #[cfg(test)]
    pub(crate) fn free_bytes(&self) -> u64 {
        self.free.lock().unwrap().iter().map(|b| b.1).sum()
    }
}

#[cfg(all(test, not(stateful_pool_loom)))]
mod tests {
    use super::*;

    #[test]
    fn first_fit_split_and_coalesce() {
        let a = Arena::new(4096, 64 * 10);
        let x = a.alloc(100, Block::No, || false).unwrap();
        assert_eq!(x, (4096, 128));
        let y = a.alloc(64, Block::No, || false).unwrap();
        let z = a.alloc(64 * 7, Block::No, || false).unwrap();
        assert!(a.alloc(1, Block::No, || false).is_none());
        a.free(y.0, y.1);
        a.free(x.0, x.1);
        assert_eq!(a.alloc(64 * 3, Block::No, || false), Some((4096, 192)));
        a.free(4096, 192);
        a.free(z.0, z.1);
        assert_eq!(a.free_bytes(), 640);
        assert_eq!(a.alloc(640, Block::No, || false), Some((4096, 640)));
        assert!(a.alloc(641, Block::Until(None), || false).is_none());
    }
}

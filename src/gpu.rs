//! GPU workers (feature `cuda`): inside a worker process, after launch (never inherited from the
//! parent), one CUDA context per assigned GPU, and the shared-memory payload arena registered as
//! page-locked host memory so host-to-device copies from a task's payload run at pinned speed.
//!
//! cudarc loads the driver at run time: the crate builds without the CUDA toolkit, and a
//! machine without a driver or GPU gives a spawn error that says so.

use cudarc::driver::{CudaContext, sys};
use std::sync::Arc;

/// Opens a context on each assigned GPU. `visible_only`: the worker's `CUDA_VISIBLE_DEVICES`
/// lists exactly `gpus`, so inside it they are ordinals `0..gpus.len()` in that order.
pub(crate) fn open(gpus: &[u32], visible_only: bool) -> Result<Vec<Arc<CudaContext>>, String> {
    // SAFETY: only probes whether libcuda can be loaded.
    if !unsafe { sys::is_culib_present() } {
        return Err(format!(
            "no CUDA driver: libcuda.so could not be loaded, so GPUs {gpus:?} cannot be used \
             (is the NVIDIA driver installed and on the library path?)"
        ));
    }
    let count = CudaContext::device_count()
        .map_err(|e| format!("CUDA driver present but unusable: {e}"))?;
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    gpus.iter()
        .enumerate()
        .map(|(i, &gpu)| {
            let ordinal = if visible_only { i } else { gpu as usize };
            if ordinal >= count.max(0) as usize {
                return Err(format!(
                    "GPU {gpu} does not exist: this worker sees {count} GPU(s){}",
                    visible
                        .as_deref()
                        .map(|v| format!(" (CUDA_VISIBLE_DEVICES={v})"))
                        .unwrap_or_default()
                ));
            }
            CudaContext::new(ordinal)
                .map_err(|e| format!("cannot create a CUDA context on GPU {gpu}: {e}"))
        })
        .collect()
}

/// A host range registered with the driver as page-locked memory for every context of this
/// process; unregistered when dropped.
#[derive(Debug)]
pub(crate) struct Pinned {
    ptr: *mut u8,
    ctx: Arc<CudaContext>,
}

impl Pinned {
    /// Registers `len` bytes at `ptr` (`CU_MEMHOSTREGISTER_PORTABLE`: pinned for every context).
    ///
    /// # Safety
    ///
    /// `ptr..ptr + len` must stay mapped until the returned value is dropped.
    pub(crate) unsafe fn register(
        ctx: &Arc<CudaContext>,
        ptr: *mut u8,
        len: usize,
    ) -> Result<Pinned, String> {
        if len == 0 {
            return Err("nothing to register".into());
        }
        ctx.bind_to_thread().map_err(|e| e.to_string())?;
        // SAFETY: the caller keeps the range mapped while registered; the context is current.
        unsafe { sys::cuMemHostRegister_v2(ptr.cast(), len, sys::CU_MEMHOSTREGISTER_PORTABLE) }
            .result()
            .map_err(|e| format!("cannot pin the payload arena ({len} bytes): {e}"))?;
        Ok(Pinned {
            ptr,
            ctx: ctx.clone(),
        })
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: `ptr` was registered by `register` and is still mapped (its contract).
            let _ = unsafe { sys::cuMemHostUnregister(self.ptr.cast()) };
        }
    }
}

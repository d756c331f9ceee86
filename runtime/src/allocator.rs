//! glibc malloc settings, chosen once per process for what it mostly allocates. `IVADO_MALLOC_DEFAULTS=1`
//! keeps glibc's defaults, to measure the difference.
//!
//! - **Networks** (training, inference): a layer's output is tens to hundreds of MiB. By default glibc maps
//!   each block over 32 MiB afresh and unmaps it when freed, so every layer of every batch page-faults its
//!   output in again. Measured on this project's 2-core CPU: `segment` 5.3 to 4.1 s per 256x256x64 volume (2D
//!   U-Net) and 2.8 to 1.9 s (3D); a training step of the 2D U-Net (batch 32 of 128x128) 5.1 to 3.3 s in bf16
//!   and 11.1 to 8.5 s in fp32. A high mmap threshold serves those blocks from the heap, and a high trim
//!   threshold keeps the freed heap top mapped for the next batch.
//! - **Loading alone** (`bench loader`, a script that only iterates a loader): a freed mapping raises glibc's
//!   dynamic mmap threshold to its size, after which volume-sized buffers come from the heap arenas, where
//!   fragmentation keeps them resident. A fixed 8 MiB threshold keeps them mapped, so freeing one returns it.
//!
//! A process that trains runs both; the network setting wins (its blocks are the large ones), and the loader's
//! memory stays bounded by its cache budget and the trim after each epoch. Both cap the malloc arenas: each
//! thread that allocates concurrently gets one of up to 64 MiB reserved (8 per core by default); a few shared
//! arenas hold the small allocations just as well.
use std::sync::atomic::{AtomicU8, Ordering};

const NETWORK_THRESHOLD: i32 = 1 << 30;
/// Allocations at least this large get their own mapping when only loading: volumes do, batches and their
/// intermediates (a few MiB) stay in the heap, where reusing them costs no page faults.
const LOADING_THRESHOLD: i32 = 8 << 20;
/// Threads that get a malloc arena of their own; more share them.
const ARENA_MAX: i32 = 4;

const UNSET: u8 = 0;
const LOADING: u8 = 1;
const NETWORKS: u8 = 2;
static POLICY: AtomicU8 = AtomicU8::new(UNSET);

fn glibc_defaults_asked() -> bool {
    std::env::var_os("IVADO_MALLOC_DEFAULTS").is_some_and(|v| v == "1")
}

/// Settings for running networks (see the module doc); overrides [`for_loading`].
pub fn for_networks() {
    if glibc_defaults_asked() || POLICY.swap(NETWORKS, Ordering::SeqCst) == NETWORKS {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; a value it refuses returns 0.
    unsafe {
        // glibc caps the threshold at half its heap size (32 MiB) on some builds.
        if libc::mallopt(libc::M_MMAP_THRESHOLD, NETWORK_THRESHOLD) == 0 {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        }
        libc::mallopt(libc::M_TRIM_THRESHOLD, NETWORK_THRESHOLD);
        libc::mallopt(libc::M_ARENA_MAX, ARENA_MAX);
    }
}

/// Settings for a loader (see the module doc), unless [`for_networks`] has set this process up already.
pub fn for_loading() {
    if glibc_defaults_asked()
        || POLICY
            .compare_exchange(UNSET, LOADING, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
    {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: as in for_networks.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, LOADING_THRESHOLD);
        libc::mallopt(libc::M_ARENA_MAX, ARENA_MAX);
    }
}

/// Returns the free memory of glibc's heaps to the system (after an epoch's workers exit).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory that is free.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_network_setting_wins_whichever_comes_first() {
        // Process-wide state: this is the only test that sets it, and every order ends the same way.
        if glibc_defaults_asked() {
            return;
        }
        for_loading();
        assert_ne!(POLICY.load(Ordering::SeqCst), UNSET);
        for_networks();
        assert_eq!(POLICY.load(Ordering::SeqCst), NETWORKS);
        // A loader started later (the next epoch's) leaves the network setting in place.
        for_loading();
        assert_eq!(POLICY.load(Ordering::SeqCst), NETWORKS);
    }
}

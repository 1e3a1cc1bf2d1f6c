//! Thread priorities: a server's admin and parallel work runs at a lower priority than the
//! writer and the HTTP handlers, so acknowledgements keep their CPU while a segment edit, a
//! recalibration or a training runs (2 cores are common). And no transparent huge pages in a
//! server, for the same acknowledgements.

/// Lowers the calling thread's scheduling priority (Linux: a nice value per thread; elsewhere
/// the call does nothing useful and fails quietly).
#[allow(
    unsafe_code,
    reason = "one libc call on the calling thread; no memory is touched"
)]
pub fn lower() {
    // SAFETY: gettid and setpriority on the calling thread's id have no memory effects.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10);
    }
}

/// Turns transparent huge pages off for this process (Linux; elsewhere nothing).
///
/// mimalloc asks for huge pages on the memory it maps (`MADV_HUGEPAGE`), so the first touch of
/// a fresh 2 MiB region zeroes all of it inside the thread that touched it. The store's
/// memtables are allocated and freed all the time, and under `scripts/bench --suite spine` that
/// zeroing held the writer for 15 to 60 ms of CPU at a time: a fifth of its samples were
/// `clear_page_erms` under `do_huge_pmd_anonymous_page`. With 4 KiB pages, event to change at
/// 50k events/s went from a p99 of 21 ms to 8 ms and the acknowledgement p99 from 20 ms to 7 ms.
/// Database servers give the same advice (Redis, MongoDB, PostgreSQL).
#[allow(
    unsafe_code,
    reason = "one prctl call on the calling process; no memory is touched"
)]
pub fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE only sets a flag of the process; it reads no memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

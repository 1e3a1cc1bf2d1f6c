//! Thread priorities: a server's admin and parallel work runs at a lower priority than the
//! writer and the HTTP handlers, so acknowledgements keep their CPU while a segment edit, a
//! recalibration or a training runs (2 cores are common).

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

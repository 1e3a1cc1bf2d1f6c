//! Thread priorities: a server's admin and parallel work runs at a lower priority than the
//! writer and the HTTP handlers, so acknowledgements keep their CPU while a segment edit, a
//! recalibration or a training runs (2 cores are common). And no transparent huge pages in a
//! server, for the same acknowledgements.

/// Lowers the calling thread's scheduling priority: nice 5 and the kernel's default time slice
/// (Linux; elsewhere nothing). Admin and parallel work keeps a share of the CPU however busy
/// ingestion is (about a quarter against each busy normal thread). Lower shares starved it:
/// `SCHED_IDLE`, and nice 10 once the latency threads had short slices, let a traits refresh run
/// over 30 s under a full test run (1 to 7 s alone). The latency of acknowledgements comes from
/// [`latency_sensitive`], not from this value. A thread spawned by a latency-sensitive one (an
/// admin job started by an HTTP handler) inherits its short slice: this gives it back the
/// default. A process already started at a lower priority keeps it.
pub fn lower() {
    #[cfg(target_os = "linux")]
    if let Some(nice) = normal_nice() {
        set_attributes(nice.max(5), 0);
    }
}

/// Asks for short time slices on the calling thread (the writer, the HTTP handlers, the
/// segment worker): Linux 6.12 and later read `sched_runtime` of `SCHED_OTHER` as the slice a
/// thread wants, and the EEVDF scheduler lets a waking thread with a shorter slice take the
/// CPU from one with a longer slice at once. Without it a waking handler waited for a
/// background thread at a lower priority to end its slice (a millisecond or more), and under
/// `scripts/bench --suite spine` the acknowledgement p99 doubled while a backfill ran. The
/// share of CPU is unchanged, and so are the thread's nice value and policy (a thread not under
/// the normal policy is left alone). Returns whether the kernel took the request; older kernels
/// and other systems ignore or refuse it.
pub fn latency_sensitive() -> bool {
    #[cfg(target_os = "linux")]
    if let Some(nice) = normal_nice() {
        // 100 us: the kernel accepts 0.1 to 100 ms; its default is 0.75 ms per log2 CPU.
        return set_attributes(nice, 100_000);
    }
    false
}

/// The calling thread's nice value, if it runs under the normal policy (`SCHED_OTHER`).
#[cfg(target_os = "linux")]
#[allow(
    unsafe_code,
    reason = "two libc calls that read the calling thread's scheduling"
)]
fn normal_nice() -> Option<i32> {
    // SAFETY: sched_getscheduler, gettid and getpriority on the calling thread read nothing of
    // ours.
    unsafe {
        if libc::sched_getscheduler(0) != libc::SCHED_OTHER {
            return None;
        }
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        *libc::__errno_location() = 0;
        let nice = libc::getpriority(libc::PRIO_PROCESS, tid);
        (*libc::__errno_location() == 0).then_some(nice)
    }
}

/// `sched_setattr` on the calling thread: the normal policy, `nice`, and the slice `runtime`
/// in nanoseconds (0: the kernel's default). Returns whether the kernel took it.
#[cfg(target_os = "linux")]
#[allow(
    unsafe_code,
    reason = "one sched_setattr call on the calling thread with a struct it only reads"
)]
fn set_attributes(nice: i32, runtime: u64) -> bool {
    /// `struct sched_attr`, as in `linux/sched/types.h` (its first version, 48 bytes).
    #[repr(C)]
    struct SchedAttr {
        size: u32,
        policy: u32,
        flags: u64,
        nice: i32,
        priority: u32,
        runtime: u64,
        deadline: u64,
        period: u64,
    }
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        policy: libc::SCHED_OTHER as u32,
        flags: 0,
        nice,
        priority: 0,
        runtime,
        deadline: 0,
        period: 0,
    };
    // SAFETY: pid 0 names the calling thread; `attr` is a valid, initialised struct of the
    // size it declares, which the kernel only reads.
    let done = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
    if done != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            nice,
            runtime,
            "the kernel refused a thread's scheduling attributes"
        );
    }
    done == 0
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

#[cfg(all(test, target_os = "linux"))]
mod tests {
    /// `se.slice` of the calling thread in nanoseconds, where the kernel shows it.
    fn slice() -> Option<u64> {
        let sched = std::fs::read_to_string("/proc/thread-self/sched").ok()?;
        let line = sched.lines().find(|l| l.starts_with("se.slice"))?;
        line.split(':').nth(1)?.trim().parse().ok()
    }

    #[test]
    fn latency_threads_get_short_slices_and_background_threads_a_lower_priority() {
        let nice = || {
            #[allow(unsafe_code, reason = "reads the calling thread's nice value")]
            // SAFETY: gettid and getpriority read nothing of ours.
            unsafe {
                let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
                libc::getpriority(libc::PRIO_PROCESS, tid)
            }
        };
        std::thread::spawn(move || {
            let before = nice();
            let taken = super::latency_sensitive();
            // Kernels before 6.12 show no slice; an unprivileged, already niced process may be
            // refused: the call must then change nothing.
            if let (true, Some(slice)) = (taken, slice()) {
                assert_eq!(slice, 100_000);
            }
            assert_eq!(nice(), before, "the nice value is kept");
            // A background thread started from this one: nice 5 and the default slice again.
            std::thread::spawn(move || {
                super::lower();
                assert!(nice() >= 5, "nice {}", nice());
                if let (true, Some(slice)) = (taken, slice()) {
                    assert_ne!(slice, 100_000, "the short slice is not inherited");
                }
            })
            .join()
            .unwrap();
        })
        .join()
        .unwrap();
    }
}

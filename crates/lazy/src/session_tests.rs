//! Event and range handling against the fake uffd.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use torpor_image::pages::Origin;

use super::*;
use crate::fake::{FakeUffd, Op};
use crate::SourceError;

const P: u64 = PAGE_SIZE;
const BASE: u64 = 0x10_0000;
/// Pages of fake memory per mm.
const PAGES: u64 = 1024;
const PID: i32 = 100;

/// Bytes of the source: byte i is a function of i, so every offset has its own pattern.
fn pattern(offset: u64) -> u8 {
    (offset.wrapping_mul(31) ^ (offset >> 12)) as u8
}

struct Source {
    fail: Arc<AtomicBool>,
    buf: Vec<u8>,
}

impl PageSource for Source {
    fn read(&mut self, origin: &Origin, len: usize) -> Result<&[u8], SourceError> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(SourceError {
                message: "pool unreachable".into(),
                corrupt: false,
            });
        }
        self.buf.clear();
        self.buf
            .extend((0..len as u64).map(|i| pattern(origin.offset + i)));
        Ok(&self.buf)
    }
}

fn origin(offset: u64) -> Origin {
    Origin {
        generation: 3,
        file: "pages-1.img".into(),
        offset,
    }
}

fn range(start: u64, len: u64, offset: u64) -> PageRange {
    PageRange {
        start,
        len,
        origin: origin(offset),
    }
}

struct Harness {
    session: Session<FakeUffd>,
    uffd: FakeUffd,
    failures: Arc<Mutex<Vec<String>>>,
    source_fails: Arc<AtomicBool>,
    shared: Arc<Shared>,
}

fn harness_with(
    ranges: Vec<PageRange>,
    prefetch: Vec<(u64, u64)>,
    fill: Fill,
    max_fault_read: u64,
) -> Harness {
    let failures = Arc::new(Mutex::new(Vec::new()));
    let source_fails = Arc::new(AtomicBool::new(false));
    let shared = Arc::new(Shared::default());
    let f = failures.clone();
    let cfg = SessionConfig {
        ranges: HashMap::from([(PID, ranges)]),
        prefetch: HashMap::from([(PID, prefetch)]),
        record_for: Duration::from_secs(3600),
        fill,
        max_fault_read,
        on_failure: Box::new(move |why| f.lock().unwrap().push(why.to_string())),
    };
    let source = Box::new(Source {
        fail: source_fails.clone(),
        buf: Vec::new(),
    });
    let mut session = Session::new(cfg, source, shared.clone()).unwrap();
    let uffd = FakeUffd::new(BASE, PAGES);
    session.add_process(PID, uffd.clone());
    Harness {
        session,
        uffd,
        failures,
        source_fails,
        shared,
    }
}

fn harness(ranges: Vec<PageRange>) -> Harness {
    harness_with(ranges, Vec::new(), Fill::OnDemand, 2 << 20)
}

impl Harness {
    fn fault(&mut self, addr: u64) {
        self.uffd.push(Event::PageFault { address: addr });
        self.session.service(0);
    }

    fn stats(&self) -> LazyStats {
        self.session.publish();
        self.shared.lock().stats.clone()
    }

    /// The fake memory at `addr` holds the origin bytes from `offset` on.
    fn assert_bytes(&self, addr: u64, len: u64, offset: u64) {
        let got = self.uffd.bytes(addr, len);
        for (i, b) in got.iter().enumerate() {
            assert_eq!(
                *b,
                pattern(offset + i as u64),
                "byte {:#x}",
                addr + i as u64
            );
        }
    }

    fn remaining(&mut self) -> Vec<PageRange> {
        self.session
            .remaining()
            .unwrap()
            .remove(&PID)
            .unwrap_or_default()
    }
}

#[test]
fn fault_in_range_copies_origin_bytes_with_a_window() {
    let mut h = harness(vec![range(BASE, 64 * P, 0x5000)]);
    h.fault(BASE + 3 * P + 0x123);
    // 64 KiB aligned window, clipped to nothing here
    assert_eq!(h.uffd.ops(), vec![Op::Copy(BASE, 16 * P)]);
    h.assert_bytes(BASE, 16 * P, 0x5000);
    let s = h.stats();
    assert_eq!((s.faults, s.faulted_bytes, s.zero_pages), (1, 16 * P, 0));
    assert_eq!(s.remaining_bytes, 48 * P);
    assert!(s.fault_wait_s > 0.0);
    assert_eq!(
        h.remaining(),
        vec![range(BASE + 16 * P, 48 * P, 0x5000 + 16 * P)]
    );
    let ws = h.shared.lock().working_set.get(&PID).unwrap().to_vec();
    assert_eq!(ws, vec![(BASE, 16 * P)]);
}

#[test]
fn readahead_doubles_on_sequential_faults_up_to_the_maximum() {
    let mut h = harness_with(
        vec![range(BASE, 512 * P, 0)],
        Vec::new(),
        Fill::OnDemand,
        256 << 10,
    );
    let mut at = BASE;
    for _ in 0..4 {
        h.fault(at);
        let Some(Op::Copy(start, len)) = h.uffd.ops().last().cloned() else {
            panic!("no copy");
        };
        assert_eq!(start, at);
        at += len;
    }
    let lens: Vec<u64> = h
        .uffd
        .ops()
        .iter()
        .map(|op| match op {
            Op::Copy(_, l) => *l,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(lens, vec![64 << 10, 128 << 10, 256 << 10, 256 << 10]);
    // a fault elsewhere starts over at 64 KiB, clipped by the range's end
    h.fault(BASE + 510 * P);
    assert_eq!(h.uffd.ops().last(), Some(&Op::Copy(BASE + 496 * P, 16 * P)));
    h.assert_bytes(BASE, at - BASE, 0);
}

#[test]
fn window_is_clipped_to_the_piece() {
    // two adjacent ranges (two VMAs): one copy never crosses from one into the other
    let mut h = harness(vec![
        range(BASE, 4 * P, 0),
        range(BASE + 4 * P, 4 * P, 0x10_0000),
    ]);
    h.fault(BASE + 5 * P);
    assert_eq!(h.uffd.ops(), vec![Op::Copy(BASE + 4 * P, 4 * P)]);
    h.assert_bytes(BASE + 4 * P, 4 * P, 0x10_0000);
}

#[test]
fn fault_outside_every_range_is_zero_filled() {
    let mut h = harness(vec![range(BASE, 4 * P, 0)]);
    h.fault(BASE + 100 * P + 17);
    assert_eq!(h.uffd.ops(), vec![Op::Zero(BASE + 100 * P, P)]);
    let s = h.stats();
    assert_eq!((s.faults, s.zero_pages, s.faulted_bytes), (1, 1, 0));
}

#[test]
fn eexist_wakes_the_present_page_and_goes_on() {
    let mut h = harness(vec![range(BASE, 16 * P, 0)]);
    h.uffd.set_present(BASE + 3 * P);
    h.fault(BASE + 8 * P);
    assert_eq!(
        h.uffd.ops(),
        vec![
            Op::Copy(BASE, 16 * P),
            Op::Wake(BASE + 3 * P, P),
            Op::Copy(BASE + 4 * P, 12 * P)
        ]
    );
    h.assert_bytes(BASE, 3 * P, 0);
    h.assert_bytes(BASE + 4 * P, 12 * P, 4 * P);
    let s = h.stats();
    assert_eq!(
        (s.faulted_bytes, s.dropped_bytes, s.remaining_bytes),
        (15 * P, P, 0)
    );
}

#[test]
fn eexist_on_zeropage_wakes() {
    let mut h = harness(vec![]);
    h.uffd.set_present(BASE);
    h.fault(BASE);
    assert_eq!(h.uffd.ops(), vec![Op::Zero(BASE, P), Op::Wake(BASE, P)]);
}

#[test]
fn eagain_drains_events_then_retries_where_the_range_moved() {
    let mut h = harness(vec![range(BASE, 16 * P, 0)]);
    {
        let mut mm = h.uffd.0.borrow_mut();
        mm.copy_errors.push_back(FillError {
            errno: Errno::EAGAIN,
            done: 2 * P,
        });
        // the mremap that caused it: the rest of the range moves up by 64 pages
        mm.events_on_error.push_back(Event::Remap {
            from: BASE,
            to: BASE + 64 * P,
            len: 16 * P,
        });
    }
    h.fault(BASE);
    assert_eq!(
        h.uffd.ops(),
        vec![Op::Copy(BASE, 16 * P), Op::Copy(BASE + 66 * P, 14 * P)]
    );
    h.assert_bytes(BASE, 2 * P, 0);
    h.assert_bytes(BASE + 66 * P, 14 * P, 2 * P);
    let s = h.stats();
    assert_eq!((s.faulted_bytes, s.remaining_bytes), (16 * P, 0));
}

#[test]
fn eagain_without_a_queued_event_waits_for_one() {
    let mut h = harness(vec![range(BASE, 16 * P, 0)]);
    h.uffd.0.borrow_mut().copy_errors.push_back(FillError {
        errno: Errno::EAGAIN,
        done: 0,
    });
    h.fault(BASE);
    assert_eq!(
        h.uffd.ops(),
        vec![Op::Copy(BASE, 16 * P), Op::Copy(BASE, 16 * P)]
    );
    assert_eq!(h.uffd.0.borrow().waits, 1);
    h.assert_bytes(BASE, 16 * P, 0);
}

#[test]
fn faults_read_during_a_drain_are_served_after_the_copy() {
    let mut h = harness(vec![
        range(BASE, 16 * P, 0),
        range(BASE + 32 * P, 16 * P, 0x40_0000),
    ]);
    {
        let mut mm = h.uffd.0.borrow_mut();
        mm.copy_errors.push_back(FillError {
            errno: Errno::EAGAIN,
            done: 0,
        });
        // a fault on the page being copied (answered by the copy) and one elsewhere
        mm.events_on_error
            .push_back(Event::PageFault { address: BASE + P });
        mm.events_on_error.push_back(Event::PageFault {
            address: BASE + 40 * P,
        });
    }
    h.fault(BASE);
    assert_eq!(
        h.uffd.ops(),
        vec![
            Op::Copy(BASE, 16 * P),
            Op::Copy(BASE, 16 * P),
            Op::Copy(BASE + 32 * P, 16 * P)
        ]
    );
    assert_eq!(h.stats().faults, 2);
}

#[test]
fn persistent_eagain_gives_up_and_wakes_so_the_thread_faults_again() {
    let mut h = harness(vec![range(BASE, 16 * P, 0)]);
    for _ in 0..=MAX_RETRIES {
        h.uffd.0.borrow_mut().copy_errors.push_back(FillError {
            errno: Errno::EAGAIN,
            done: 0,
        });
    }
    h.fault(BASE);
    assert_eq!(h.uffd.ops().last(), Some(&Op::Wake(BASE, 16 * P)));
    assert!(h.session.failed().is_none());
    assert_eq!(h.remaining(), vec![range(BASE, 16 * P, 0)]);
    // the thread's next fault is served
    h.fault(BASE);
    h.assert_bytes(BASE, 16 * P, 0);
}

#[test]
fn persistent_enoent_is_fatal_rather_than_zero_filled() {
    // a range the restorer never registered: copying keeps failing with ENOENT
    let mut h = harness(vec![range(BASE + PAGES * P, 4 * P, 0)]);
    h.fault(BASE + PAGES * P);
    assert_eq!(h.failures.lock().unwrap().len(), 1);
    assert!(!h.uffd.ops().iter().any(|op| matches!(op, Op::Zero(..))));
}

#[test]
fn remove_unregisters_and_drops() {
    let mut h = harness(vec![range(BASE, 16 * P, 0)]);
    h.uffd.push(Event::Remove {
        start: BASE + 4 * P,
        end: BASE + 8 * P,
    });
    h.session.service(0);
    assert_eq!(h.uffd.ops(), vec![Op::Unregister(BASE + 4 * P, 4 * P)]);
    assert_eq!(
        h.remaining(),
        vec![range(BASE, 4 * P, 0), range(BASE + 8 * P, 8 * P, 8 * P)]
    );
    let s = h.stats();
    assert_eq!(
        (s.dropped_bytes, s.remaining_bytes, s.lazy_bytes),
        (4 * P, 12 * P, 16 * P)
    );
}

#[test]
fn remove_after_the_mm_is_gone_drops_everything() {
    let mut h = harness(vec![range(BASE, 16 * P, 0)]);
    h.uffd.0.borrow_mut().gone = true;
    h.uffd.push(Event::Remove {
        start: BASE,
        end: BASE + P,
    });
    h.session.service(0);
    assert!(h.session.all_filled());
    assert_eq!(h.stats().dropped_bytes, 16 * P);
}

#[test]
fn unmap_drops_without_unregistering() {
    let mut h = harness(vec![range(BASE, 16 * P, 0)]);
    h.uffd.push(Event::Unmap {
        start: BASE + 8 * P,
        end: BASE + 32 * P,
    });
    h.session.service(0);
    assert!(h.uffd.ops().is_empty());
    assert_eq!(h.remaining(), vec![range(BASE, 8 * P, 0)]);
}

#[test]
fn remap_shifts_ranges_and_keeps_origins() {
    let mut h = harness(vec![range(BASE, 16 * P, 0)]);
    h.uffd.push(Event::Remap {
        from: BASE + 8 * P,
        to: BASE + 100 * P,
        len: 8 * P,
    });
    h.session.service(0);
    assert_eq!(
        h.remaining(),
        vec![range(BASE, 8 * P, 0), range(BASE + 100 * P, 8 * P, 8 * P)]
    );
    h.fault(BASE + 101 * P);
    h.assert_bytes(BASE + 100 * P, 8 * P, 8 * P);
}

#[test]
fn fork_gives_the_child_the_parents_remaining_and_in_flight_ranges() {
    let mut h = harness(vec![
        range(BASE, 16 * P, 0),
        range(BASE + 32 * P, 4 * P, 0x9000),
    ]);
    let child = FakeUffd::new(BASE, PAGES);
    {
        // the fork happens while the first range is being copied into the parent
        let mut mm = h.uffd.0.borrow_mut();
        mm.copy_errors.push_back(FillError {
            errno: Errno::EAGAIN,
            done: 0,
        });
        mm.events_on_error.push_back(Event::Fork(child.clone()));
    }
    h.fault(BASE);
    assert_eq!(h.session.procs.len(), 2);
    let kid = &h.session.procs[1];
    assert!(kid.forked);
    assert_eq!(kid.pid, PID);
    assert_eq!(
        kid.remaining.iter().collect::<Vec<_>>(),
        vec![range(BASE, 16 * P, 0), range(BASE + 32 * P, 4 * P, 0x9000)]
    );
    let s = h.stats();
    assert_eq!((s.forks, s.lazy_bytes), (1, 40 * P));
    // the child's faults are served on the child's uffd
    child.push(Event::PageFault {
        address: BASE + 33 * P,
    });
    h.session.service(1);
    assert_eq!(child.ops(), vec![Op::Copy(BASE + 32 * P, 4 * P)]);
    let want: Vec<u8> = (0..4 * P).map(|i| pattern(0x9000 + i)).collect();
    assert_eq!(child.bytes(BASE + 32 * P, 4 * P), want);
    // a live forked child with ranges cannot be attributed
    assert_eq!(
        h.session.remaining(),
        Err(Unprovable::ForkedChild { parent: PID })
    );
    child.0.borrow_mut().gone = true;
    assert_eq!(h.remaining(), vec![range(BASE + 32 * P, 4 * P, 0x9000)]);
}

#[test]
fn source_failure_calls_on_failure_once_and_fills_nothing() {
    let mut h = harness(vec![range(BASE, 16 * P, 0)]);
    h.source_fails.store(true, Ordering::SeqCst);
    h.fault(BASE);
    h.fault(BASE + 100 * P);
    assert!(
        h.uffd.ops().is_empty(),
        "nothing copied or zero-filled: {:?}",
        h.uffd.ops()
    );
    let failures = h.failures.lock().unwrap().clone();
    assert_eq!(failures.len(), 1);
    assert!(failures[0].contains("pool unreachable"), "{failures:?}");
    assert!(h.stats().failed.is_some());
    assert!(matches!(h.session.remaining(), Err(Unprovable::Failed(_))));
    // the uffd stays open until the session goes
    assert!(h.session.procs[0].uffd.is_some());
}

#[test]
fn a_copy_into_a_gone_mm_drops_its_ranges() {
    let mut h = harness(vec![range(BASE, 16 * P, 0)]);
    h.uffd.0.borrow_mut().gone = true;
    h.fault(BASE);
    assert!(h.session.procs[0].uffd.is_none());
    assert!(h.failures.lock().unwrap().is_empty());
    let s = h.stats();
    assert_eq!((s.dropped_bytes, s.remaining_bytes), (16 * P, 0));
}

#[test]
fn remaining_leaves_out_dead_processes() {
    let mut h = harness(vec![range(BASE, 16 * P, 0)]);
    assert_eq!(h.remaining().len(), 1);
    h.uffd.0.borrow_mut().gone = true;
    assert!(h.session.remaining().unwrap().is_empty());
}

#[test]
fn unknown_event_is_fatal() {
    let mut h = harness(vec![range(BASE, 16 * P, 0)]);
    h.uffd.push(Event::Unknown(0x42));
    h.session.service(0);
    assert_eq!(h.failures.lock().unwrap().len(), 1);
}

#[test]
fn prefetch_after_fin_copies_only_lazy_parts_in_large_chunks() {
    let ranges = vec![
        range(BASE, 16 * P, 0),
        range(BASE + 32 * P, 2048 * P, 0x10_0000),
    ];
    let prefetch = vec![(BASE + 8 * P, 40 * P), (BASE + 100 * P, 1500 * P)];
    let mut h = harness_with(ranges, prefetch, Fill::OnDemand, 2 << 20);
    h.uffd = FakeUffd::new(BASE, 4096);
    h.session.procs[0].uffd = Some(h.uffd.clone());
    assert!(!h.session.step(), "no prefetch before FIN");
    h.session.finish();
    while h.session.step() {}
    assert_eq!(
        h.uffd.ops(),
        vec![
            Op::Copy(BASE + 8 * P, 8 * P),
            Op::Copy(BASE + 32 * P, 16 * P),
            Op::Copy(BASE + 100 * P, 1024 * P),
            Op::Copy(BASE + 1124 * P, 476 * P),
        ]
    );
    h.assert_bytes(BASE + 100 * P, 1500 * P, 0x10_0000 + 68 * P);
    let s = h.stats();
    assert_eq!(s.prefetched_bytes, (8 + 16 + 1500) * P);
    assert!(!h.session.has_work(), "on demand: no background fill");
}

#[test]
fn background_fill_copies_everything_then_retires_the_process() {
    let mut h = harness_with(
        vec![
            range(BASE, 16 * P, 0),
            range(BASE + 64 * P, 300 * P, 0x20_0000),
        ],
        Vec::new(),
        Fill::Background,
        2 << 20,
    );
    h.session.finish();
    let mut steps = 0;
    while h.session.step() {
        steps += 1;
    }
    assert!(steps >= 3, "grows chunk by chunk");
    h.assert_bytes(BASE, 16 * P, 0);
    h.assert_bytes(BASE + 64 * P, 300 * P, 0x20_0000);
    let s = h.stats();
    assert_eq!((s.background_bytes, s.remaining_bytes), (316 * P, 0));
    assert!(
        h.shared.lock().working_set.is_empty(),
        "background is not working set"
    );
    h.session.retire_done();
    assert!(h.session.procs[0].uffd.is_none());
}

#[test]
fn fill_all_overrides_on_demand() {
    let mut h = harness(vec![range(BASE, 16 * P, 0)]);
    h.session.finish();
    assert!(!h.session.has_work());
    h.session.request_fill_all(true);
    assert!(h.session.has_work());
    while h.session.step() {}
    assert!(h.session.all_filled());
}

#[test]
fn shutdown_before_fin_with_ranges_left_gives_up() {
    let mut h = harness(vec![range(BASE, 16 * P, 0)]);
    h.session.begin_shutdown();
    assert_eq!(h.failures.lock().unwrap().len(), 1);
    assert!(h.uffd.ops().is_empty());
}

#[test]
fn dropping_with_ranges_left_in_a_live_mm_kills_the_tree() {
    let h = harness(vec![range(BASE, 16 * P, 0)]);
    let failures = h.failures.clone();
    drop(h);
    assert_eq!(failures.lock().unwrap().len(), 1);

    let h = harness(vec![range(BASE, 16 * P, 0)]);
    h.uffd.0.borrow_mut().gone = true;
    let failures = h.failures.clone();
    drop(h);
    assert!(
        failures.lock().unwrap().is_empty(),
        "a dead tree needs no killing"
    );
}

#[test]
fn stats_add_up() {
    let mut h = harness_with(
        vec![
            range(BASE, 64 * P, 0),
            range(BASE + 128 * P, 64 * P, 0x40_0000),
        ],
        vec![(BASE + 128 * P, 8 * P)],
        Fill::OnDemand,
        2 << 20,
    );
    h.uffd.set_present(BASE + 20 * P);
    h.fault(BASE + 17 * P);
    h.uffd.push(Event::Unmap {
        start: BASE + 40 * P,
        end: BASE + 48 * P,
    });
    h.session.service(0);
    h.session.finish();
    while h.session.step() {}
    let s = h.stats();
    assert_eq!(
        s.lazy_bytes,
        s.faulted_bytes
            + s.prefetched_bytes
            + s.background_bytes
            + s.dropped_bytes
            + s.remaining_bytes,
        "{s:?}"
    );
    assert_eq!(s.prefetched_bytes, 8 * P);
}

#[test]
fn a_fault_read_while_retiring_a_filled_process_is_answered_before_the_close() {
    let mut h = harness_with(
        vec![range(BASE, 16 * P, 0)],
        Vec::new(),
        Fill::Background,
        2 << 20,
    );
    h.session.finish();
    while h.session.step() {}
    assert!(h.session.all_filled());
    assert!(!h.session.has_work());
    let before = h.uffd.ops().len();
    // faults that arrive as the fill ends, read only by retire_done: one in a registered
    // hole, one on a page the fill just copied (the thread faulted before the copy landed)
    h.uffd.push(Event::PageFault {
        address: BASE + 100 * P + 8,
    });
    h.uffd.push(Event::PageFault {
        address: BASE + 3 * P,
    });
    h.session.retire_done();
    assert_eq!(
        h.uffd.ops()[before..],
        [
            Op::Zero(BASE + 100 * P, P),
            Op::Zero(BASE + 3 * P, P),
            Op::Wake(BASE + 3 * P, P)
        ],
        "both faulting threads are answered on the still open uffd"
    );
    assert!(h.session.queue.is_empty(), "no fault left waiting");
    assert!(h.session.procs[0].uffd.is_none(), "then the uffd is closed");
    assert!(!h.session.has_work());
    let s = h.stats();
    assert_eq!((s.faults, s.zero_pages), (2, 1));
    h.assert_bytes(BASE, 16 * P, 0);
}

#[test]
fn a_queued_fault_is_work_and_the_next_step_answers_it() {
    // before FIN: nothing to prefetch or fill yet, but a queued fault is work
    let mut h = harness_with(
        vec![range(BASE, 16 * P, 0)],
        Vec::new(),
        Fill::Background,
        2 << 20,
    );
    assert!(!h.session.has_work());
    h.uffd.push(Event::PageFault { address: BASE });
    h.session.read_and_apply(0);
    assert_eq!(h.session.queue.len(), 1);
    assert!(h.uffd.ops().is_empty());
    assert!(h.session.has_work());
    assert!(!h.session.step(), "no prefetch or fill before FIN");
    assert_eq!(h.uffd.ops(), vec![Op::Copy(BASE, 16 * P)]);
    h.assert_bytes(BASE, 16 * P, 0);
    assert!(h.session.queue.is_empty());
    assert!(!h.session.has_work());

    // after FIN, on demand with no prefetch: the queued fault is the only work
    let mut h = harness(vec![range(BASE, 16 * P, 0)]);
    h.session.finish();
    assert!(!h.session.has_work());
    h.uffd.push(Event::PageFault {
        address: BASE + 100 * P,
    });
    h.session.read_and_apply(0);
    assert!(h.session.has_work());
    assert!(!h.session.step(), "on demand: nothing but the fault");
    assert_eq!(h.uffd.ops(), vec![Op::Zero(BASE + 100 * P, P)]);
    assert!(h.session.queue.is_empty());
    assert!(!h.session.has_work());
    let s = h.stats();
    assert_eq!((s.faults, s.zero_pages), (1, 1));
}

#[test]
fn fill_from_copies_exactly_the_ranges_of_the_named_generations() {
    let old = |start, len, offset| PageRange {
        start,
        len,
        origin: Origin {
            generation: 1,
            file: "pages-1.img".into(),
            offset,
        },
    };
    let mut h = harness(vec![
        old(BASE, 8 * P, 0),
        range(BASE + 8 * P, 8 * P, 0x20000),
        old(BASE + 32 * P, 4 * P, 0x8000),
    ]);
    let copied = h.session.fill_from(&BTreeSet::from([1])).unwrap();
    assert_eq!(copied, 12 * P);
    assert_eq!(
        h.uffd.ops(),
        vec![Op::Copy(BASE, 8 * P), Op::Copy(BASE + 32 * P, 4 * P)]
    );
    h.assert_bytes(BASE, 8 * P, 0);
    h.assert_bytes(BASE + 32 * P, 4 * P, 0x8000);
    // generation 3's range is still only in the pool
    assert_eq!(h.remaining(), vec![range(BASE + 8 * P, 8 * P, 0x20000)]);
    assert_eq!(h.session.fill_from(&BTreeSet::from([7])).unwrap(), 0);
}

#[test]
fn prefetch_pending_is_published_until_the_working_set_is_pushed() {
    let mut h = harness_with(
        vec![range(BASE, 64 * P, 0)],
        vec![(BASE, 8 * P)],
        Fill::OnDemand,
        2 << 20,
    );
    assert!(!h.stats().prefetch_pending, "nothing before FIN");
    h.session.finish();
    assert!(
        h.shared.lock().stats.prefetch_pending,
        "set with FIN itself"
    );
    while h.session.step() {}
    let s = h.stats();
    assert!(!s.prefetch_pending);
    assert_eq!(s.prefetched_bytes, 8 * P);
}

#[test]
fn resumed_restarts_the_record_window_and_sets_the_fill() {
    // A restore held before its tasks resume: FIN long before the tasks run.
    let mut h = harness(vec![range(BASE, 64 * P, 0)]);
    h.session.record_for = Duration::ZERO;
    h.session.finish();
    h.fault(BASE);
    assert!(
        h.shared.lock().working_set.is_empty(),
        "the window that started at FIN is over"
    );
    assert!(!h.session.has_work(), "held on demand: nothing filled");
    h.session.record_for = Duration::from_secs(3600);
    h.session.resumed(Fill::Background);
    h.fault(BASE + 32 * P);
    let ws = h.shared.lock().working_set.get(&PID).unwrap().to_vec();
    assert_eq!(
        ws,
        vec![(BASE + 32 * P, 16 * P)],
        "recorded after the release"
    );
    assert!(h.session.has_work(), "background fill runs once released");
    while h.session.step() {}
    assert!(h.session.all_filled());
}

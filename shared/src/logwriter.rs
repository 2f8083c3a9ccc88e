//! The log writer thread: lines are appended to a buffer of the thread that logs them,
//! and one thread per output drains every buffer about once a millisecond while lines keep
//! coming, all of them in one writev(2).
//!
//! # Why per-thread buffers
//!
//! Under a flood of unauthorized requests the gateway writes one audit line per request,
//! 100k lines a second on this machine. A queue of lines cost two allocations per line,
//! a free on another core, and a copy of every line, cold, into the writer's buffer; a
//! buffer per thread costs a copy into memory that is already in the logging core's cache
//! and an uncontended lock. The writer swaps a buffer out under its lock and writes it
//! whole, so lines never tear.
//!
//! Lines of one thread keep their order. Lines of different threads are ordered by the
//! millisecond they were drained in, not exactly; every line carries its own timestamp.
//! Nothing is dropped: a thread whose buffer holds [`MAX_PENDING`] bytes waits for the
//! writer, as it used to wait on a full queue.

use std::{
    cell::RefCell,
    io::{self, IoSlice, Write},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard, OnceLock,
    },
    thread::{JoinHandle, Thread},
    time::Duration,
};

use tracing_subscriber::fmt::MakeWriter;

/// How long the writer thread gathers lines after the first of a burst before it writes
/// them: the bound on how long a line waits, and what turns a burst into one write(2).
pub const GATHER: Duration = Duration::from_millis(1);

/// Bytes one thread may have waiting before its next line waits for the writer.
pub const MAX_PENDING: usize = 4 << 20;

/// The capacity a drained buffer keeps for reuse.
const SPARE_KEEP: usize = 256 * 1024;

/// One thread's pending lines for one writer.
type Pending = Arc<Mutex<Vec<u8>>>;

fn lock(p: &Mutex<Vec<u8>>) -> MutexGuard<'_, Vec<u8>> {
    // A panic while appending leaves whole lines behind it at worst; keep logging.
    p.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the producers and the writer thread share.
#[derive(Debug)]
struct Shared {
    /// Tells this writer's buffers apart in a thread's list of buffers.
    id: usize,
    /// Every thread's buffer, registered at its first line.
    buffers: Mutex<Vec<Pending>>,
    /// The writer is (about to be) parked: the next line must wake it.
    sleeping: AtomicBool,
    /// The guard was dropped: write what is left and stop.
    closed: AtomicBool,
    thread: OnceLock<Thread>,
}

impl Shared {
    fn wake(&self) {
        if let Some(t) = self.thread.get() {
            t.unpark();
        }
    }

    /// The calling thread's buffer for this writer, registered on first use.
    fn local(self: &Arc<Self>) -> Pending {
        thread_local! {
            static LOCAL: RefCell<Vec<(usize, Pending)>> = const { RefCell::new(Vec::new()) };
        }
        let register = || {
            let p: Pending = Arc::new(Mutex::new(Vec::with_capacity(16 * 1024)));
            self.buffers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(p.clone());
            p
        };
        LOCAL
            .try_with(|l| {
                let mut l = l.borrow_mut();
                if let Some((_, p)) = l.iter().find(|(id, _)| *id == self.id) {
                    return p.clone();
                }
                let p = register();
                l.push((self.id, p.clone()));
                p
            })
            // Logging from a thread-local destructor at thread exit: a buffer of its own,
            // written once and forgotten like that of any thread that has exited.
            .unwrap_or_else(|_| register())
    }

    fn append(self: &Arc<Self>, line: &[u8]) -> io::Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(io::Error::other("the log writer thread has stopped"));
        }
        let pending = self.local();
        let mut buf = lock(&pending);
        while buf.len() >= MAX_PENDING && !self.closed.load(Ordering::Acquire) {
            drop(buf);
            self.sleeping.store(false, Ordering::SeqCst);
            self.wake();
            std::thread::sleep(GATHER);
            buf = lock(&pending);
        }
        buf.extend_from_slice(line);
        drop(buf);
        if self.sleeping.load(Ordering::Relaxed) && self.sleeping.swap(false, Ordering::SeqCst) {
            self.wake();
        }
        Ok(())
    }

    fn any_pending(&self) -> bool {
        let buffers = self.buffers.lock().unwrap_or_else(|e| e.into_inner());
        buffers.iter().any(|p| !lock(p).is_empty())
    }

    /// Writes every buffer's lines, all in one write(2) when `out` takes vectors; returns
    /// how many bytes. Buffers of threads that have exited are written one last time and
    /// forgotten.
    fn drain<W: Write>(&self, out: &mut W, spares: &mut Vec<Vec<u8>>) -> usize {
        let buffers: Vec<Pending> = {
            let mut b = self.buffers.lock().unwrap_or_else(|e| e.into_inner());
            // Only this list holds a buffer whose thread has exited; its lines are still
            // taken below, through the clone.
            let all = b.clone();
            b.retain(|p| Arc::strong_count(p) > 2);
            all
        };
        let mut taken: Vec<Vec<u8>> = Vec::with_capacity(buffers.len());
        for p in &buffers {
            let mut buf = lock(p);
            if !buf.is_empty() {
                let spare = spares.pop().unwrap_or_default();
                taken.push(std::mem::replace(&mut *buf, spare));
            }
        }
        let written = taken.iter().map(Vec::len).sum();
        if written > 0 {
            let mut slices: Vec<IoSlice<'_>> = taken.iter().map(|b| IoSlice::new(b)).collect();
            // Lines that cannot be written have nowhere better to go; the next are tried.
            let _ = write_all_vectored(out, &mut slices);
            let _ = out.flush();
        }
        for mut b in taken {
            b.clear();
            // A burst may have grown a buffer to megabytes; keep what a steady flow needs.
            if b.capacity() > SPARE_KEEP {
                b.shrink_to(SPARE_KEEP);
            }
            spares.push(b);
        }
        written
    }

    fn run<W: Write>(&self, mut out: W) {
        let mut spares = Vec::new();
        loop {
            // Idle: announce it, look once more, then sleep until a line arrives.
            self.sleeping.store(true, Ordering::SeqCst);
            if !self.closed.load(Ordering::Acquire) && !self.any_pending() {
                std::thread::park();
            }
            self.sleeping.store(false, Ordering::SeqCst);
            // Busy: gather, write, and go on while lines keep coming.
            loop {
                if self.closed.load(Ordering::Acquire) {
                    while self.drain(&mut out, &mut spares) > 0 {}
                    return;
                }
                std::thread::sleep(GATHER);
                if self.drain(&mut out, &mut spares) == 0 {
                    break;
                }
            }
        }
    }
}

/// `Write::write_all_vectored`, which is not stable yet.
fn write_all_vectored<W: Write>(out: &mut W, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    while !bufs.is_empty() {
        match out.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The handle through which formatted lines reach a writer thread (see [`batch_writer`]).
/// Each `write` call must be whole lines (`tracing-subscriber` writes one event per call).
#[derive(Debug, Clone)]
pub struct BatchWriter {
    shared: Arc<Shared>,
}

impl Write for &BatchWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.shared.append(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BatchWriter {
    type Writer = &'a BatchWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

/// Stops the writer thread at drop, after it has written every line it was given.
#[derive(Debug)]
pub struct BatchGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for BatchGuard {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts a thread that writes the lines given to the returned [`BatchWriter`] to `out`.
///
/// When idle the thread is parked; the first line of a burst wakes it, it waits
/// [`GATHER`], then writes every logging thread's lines in one write(2), and goes on while
/// lines keep coming, without being woken again. So under a flood of audit lines the
/// producers never wake it, it makes about one write(2) per millisecond, and no line
/// waits more than about a millisecond.
pub fn batch_writer<W: Write + Send + 'static>(
    name: &str,
    out: W,
) -> io::Result<(BatchWriter, BatchGuard)> {
    static NEXT_ID: AtomicUsize = AtomicUsize::new(0);
    let shared = Arc::new(Shared {
        id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        buffers: Mutex::new(Vec::new()),
        sleeping: AtomicBool::new(false),
        closed: AtomicBool::new(false),
        thread: OnceLock::new(),
    });
    let s = shared.clone();
    let thread = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || s.run(out))?;
    let _ = shared.thread.set(thread.thread().clone());
    // A line appended before the handle was set found nobody to wake; look now.
    shared.wake();
    Ok((
        BatchWriter {
            shared: shared.clone(),
        },
        BatchGuard {
            shared,
            thread: Some(thread),
        },
    ))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An output that keeps what is written, for tests here and in `telemetry`.
    #[derive(Clone, Default)]
    pub(crate) struct Capture(pub(crate) Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn lines(cap: &Capture) -> Vec<String> {
        String::from_utf8(cap.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn every_line_of_every_thread_arrives_whole_and_in_its_threads_order() {
        let cap = Capture::default();
        let (w, guard) = batch_writer("test-writer", cap.clone()).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let w = w.clone();
                std::thread::spawn(move || {
                    for i in 0..20_000 {
                        // One line per write call, as tracing-subscriber writes them.
                        let line = format!("thread {t} line {i:06} {}\n", "x".repeat(i % 97));
                        let mut out = &w;
                        out.write_all(line.as_bytes()).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // The threads have exited: their buffers are still written.
        drop(guard);
        let got = lines(&cap);
        assert_eq!(got.len(), 80_000);
        for t in 0..4 {
            let mine: Vec<usize> = got
                .iter()
                .filter(|l| l.starts_with(&format!("thread {t} ")))
                .map(|l| {
                    let parts: Vec<&str> = l.split(' ').collect();
                    let i: usize = parts[3].parse().unwrap();
                    assert_eq!(parts.get(4).map_or(0, |x| x.len()), i % 97, "torn: {l}");
                    i
                })
                .collect();
            assert_eq!(
                mine,
                (0..20_000).collect::<Vec<_>>(),
                "thread {t} out of order"
            );
        }
    }

    #[test]
    fn a_line_is_written_within_milliseconds_without_any_flush() {
        let cap = Capture::default();
        let (w, _guard) = batch_writer("test-writer", cap.clone()).unwrap();
        for round in 0..3 {
            let mut out = &w;
            writeln!(out, "line {round}").unwrap();
            let start = std::time::Instant::now();
            while lines(&cap).len() <= round {
                assert!(
                    start.elapsed() < Duration::from_secs(5),
                    "line {round} never written"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            // Let the writer go idle again, so the next line has to wake it.
            std::thread::sleep(GATHER * 5);
        }
    }

    #[test]
    fn writing_after_the_guard_is_dropped_is_an_error() {
        let cap = Capture::default();
        let (w, guard) = batch_writer("test-writer", cap.clone()).unwrap();
        drop(guard);
        let mut out = &w;
        assert!(out.write_all(b"late\n").is_err());
    }
}

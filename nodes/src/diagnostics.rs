//! The node's diagnostic log lines (tracing's output, not the event log) on stderr, written by a
//! thread of their own.
//!
//! A runtime worker that logs only formats its line and appends it to a shared buffer; a writer
//! thread gathers what came for a few milliseconds and writes it with one `write`. Before, each
//! line was one `write` on the worker that logged it (measured at about 20 µs a line on a webhook's
//! path). The buffer is bounded: lines that find it full are dropped and counted, and the count is
//! written in their place, so a stuck stderr never stalls a worker. [`Lines::flush`] writes what is
//! pending (at exit).

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// How long the writer gathers lines after the first of a batch.
const GATHER: Duration = Duration::from_millis(10);

/// Lines waiting for the writer, at most (bytes).
const PENDING_BYTES: usize = 4 << 20;

#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    dropped: u64,
}

type Out = Box<dyn Write + Send>;

struct Shared {
    pending: Mutex<Pending>,
    ready: Condvar,
    /// Where the lines go; held while writing, so they get there in the order they came.
    out: Mutex<Out>,
    /// Bytes that may wait.
    cap: usize,
}

impl Shared {
    /// Writes what is pending, in order, to `out` (held by the caller).
    fn write_pending(&self, out: &mut Out, spare: &mut Vec<u8>) {
        let dropped = {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::swap(&mut p.bytes, spare);
            std::mem::take(&mut p.dropped)
        };
        let _ = out.write_all(spare);
        if dropped > 0 {
            let _ = writeln!(out, "voxgate: {dropped} log lines dropped (stderr did not keep up)");
        }
        let _ = out.flush();
        spare.clear();
        // A burst's buffer is not kept for ever.
        spare.shrink_to(64 << 10);
    }
}

/// Where tracing writes: stderr, through the writer thread.
#[derive(Clone)]
pub struct Lines {
    shared: Arc<Shared>,
}

impl Lines {
    /// Starts the writer thread, to stderr.
    pub fn start() -> std::io::Result<Self> {
        Self::start_to(Box::new(std::io::stderr()), PENDING_BYTES)
    }

    fn start_to(out: Out, cap: usize) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending { bytes: Vec::with_capacity(64 << 10), dropped: 0 }),
            ready: Condvar::new(),
            out: Mutex::new(out),
            cap,
        });
        let s = shared.clone();
        std::thread::Builder::new().name("log-lines".into()).spawn(move || {
            let mut spare = Vec::with_capacity(64 << 10);
            loop {
                {
                    let p = s.pending.lock().unwrap_or_else(|e| e.into_inner());
                    let _p = s.ready.wait_while(p, |p| p.bytes.is_empty() && p.dropped == 0);
                }
                std::thread::sleep(GATHER);
                let mut out = s.out.lock().unwrap_or_else(|e| e.into_inner());
                s.write_pending(&mut out, &mut spare);
            }
        })?;
        Ok(Self { shared })
    }

    /// Writes every line taken so far (the writer thread may be asleep).
    pub fn flush(&self) {
        let mut out = self.shared.out.lock().unwrap_or_else(|e| e.into_inner());
        self.shared.write_pending(&mut out, &mut Vec::new());
    }

    fn push(&self, line: &[u8]) {
        let mut p = self.shared.pending.lock().unwrap_or_else(|e| e.into_inner());
        let first = p.bytes.is_empty() && p.dropped == 0;
        if p.bytes.len() + line.len() > self.shared.cap {
            // Counted; the count is written like a line (so it too wakes the writer).
            p.dropped += 1;
        } else {
            p.bytes.extend_from_slice(line);
        }
        drop(p);
        // Only the first line (or drop) of a batch wakes the writer.
        if first {
            self.shared.ready.notify_one();
        }
    }
}

/// One event's output (tracing writes each event with one `write_all`).
pub struct Line<'a>(&'a Lines);

impl Write for Line<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Lines {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        Line(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Write` the test reads back.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn text(sink: &Sink) -> String {
        String::from_utf8(sink.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn lines_arrive_whole_and_in_order_and_a_full_buffer_drops_and_counts() {
        let sink = Sink::default();
        let lines = Lines::start_to(Box::new(sink.clone()), 64).unwrap();
        for i in 0..3 {
            lines.push(format!("line {i}\n").as_bytes());
        }
        // The writer thread takes them on its own.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while text(&sink).is_empty() {
            assert!(std::time::Instant::now() < deadline, "the writer thread wrote nothing");
            std::thread::sleep(Duration::from_millis(5));
        }
        lines.flush();
        assert_eq!(text(&sink), "line 0\nline 1\nline 2\n");

        // While the writer cannot write (we hold its output), a line past the bound is dropped
        // and counted, and the count is written where it was.
        {
            let _out = lines.shared.out.lock().unwrap();
            lines.push(&[b'a'; 40]);
            lines.push(&[b'b'; 40]);
            lines.push(b"c\n");
        }
        lines.flush();
        let all = text(&sink);
        let tail = &all["line 0\nline 1\nline 2\n".len()..];
        assert_eq!(tail, format!("{}c\nvoxgate: 1 log lines dropped (stderr did not keep up)\n", "a".repeat(40)));

        // A batch that starts with a dropped line still wakes the writer, and what follows is
        // written without a flush.
        let before = text(&sink).len();
        lines.push(&[b'z'; 65]);
        lines.push(b"after\n");
        while text(&sink).len() == before {
            assert!(std::time::Instant::now() < deadline, "a batch that began with a drop was never written");
            std::thread::sleep(Duration::from_millis(5));
        }
        lines.flush();
        assert_eq!(&text(&sink)[before..], "after\nvoxgate: 1 log lines dropped (stderr did not keep up)\n");
    }
}

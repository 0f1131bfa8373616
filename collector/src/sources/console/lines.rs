//! Line assembly per (process, stream): bytes from successive writes in, lines out. Pure, no
//! clock: the caller says when a partial line has idled long enough.
//!
//! - `\n`, `\r\n` and a bare `\r` end a line (a `\r\n` split across two writes ends one).
//! - A line longer than the maximum is cut into pieces of at most that many bytes, at a UTF-8
//!   character boundary when one is near, each piece but the last marked [`LineEnd::Split`].
//! - A write the kernel cut (over 64 KiB) ends the line at the cut, marked [`LineEnd::Cut`]:
//!   what follows did not come after it.
//! - A line's time is the kernel time of the write that began it.

pub(crate) use crate::model::console::LineEnd;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Line {
    /// Kernel time (`CLOCK_BOOTTIME`) of the write that began the line.
    pub(crate) boot_ns: u64,
    pub(crate) bytes: Vec<u8>,
    pub(crate) end: LineEnd,
}

#[derive(Debug)]
pub(crate) struct LineAssembler {
    max: usize,
    buf: Vec<u8>,
    /// Whether a line has begun (it may be empty so far: a cut can end an empty line).
    begun: bool,
    first_ns: u64,
    /// The last byte seen was a `\r`: a `\n` next belongs to it.
    after_cr: bool,
}

impl LineAssembler {
    pub(crate) fn new(max_line_bytes: usize) -> Self {
        Self {
            max: max_line_bytes.max(4),
            buf: Vec::new(),
            begun: false,
            first_ns: 0,
            after_cr: false,
        }
    }

    /// Bytes of a line not yet emitted.
    pub(crate) fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Adds the bytes of one write, made at `boot_ns`, of which the kernel cut `cut` more.
    pub(crate) fn push(&mut self, boot_ns: u64, mut data: &[u8], cut: u64, out: &mut Vec<Line>) {
        if self.after_cr && !data.is_empty() {
            self.after_cr = false;
            if data[0] == b'\n' {
                data = &data[1..];
            }
        }
        while let Some(pos) = memchr::memchr2(b'\n', b'\r', data) {
            self.append(boot_ns, &data[..pos], out);
            self.begin(boot_ns);
            self.emit(LineEnd::Newline, out);
            let rest = &data[pos + 1..];
            data = if data[pos] == b'\r' {
                match rest.first() {
                    Some(b'\n') => &rest[1..],
                    Some(_) => rest,
                    None => {
                        self.after_cr = true;
                        rest
                    }
                }
            } else {
                rest
            };
        }
        self.append(boot_ns, data, out);
        if cut > 0 {
            self.begin(boot_ns);
            self.after_cr = false;
            self.emit(LineEnd::Cut(cut), out);
        }
    }

    /// Output went missing here: the unterminated line, if any, ends (as
    /// [`LineEnd::Partial`]), and nothing before the gap joins what comes after it (a `\n`
    /// after the gap is not the end of a `\r\n` before it).
    pub(crate) fn break_at_gap(&mut self, out: &mut Vec<Line>) {
        self.flush(out);
        self.after_cr = false;
        self.begun = false;
    }

    /// Emits the unterminated line, if any, as [`LineEnd::Partial`].
    pub(crate) fn flush(&mut self, out: &mut Vec<Line>) {
        if !self.buf.is_empty() {
            self.emit(LineEnd::Partial, out);
        }
    }

    fn begin(&mut self, boot_ns: u64) {
        if !self.begun {
            self.begun = true;
            self.first_ns = boot_ns;
        }
    }

    fn append(&mut self, boot_ns: u64, bytes: &[u8], out: &mut Vec<Line>) {
        if bytes.is_empty() {
            return;
        }
        self.begin(boot_ns);
        self.buf.extend_from_slice(bytes);
        while self.buf.len() > self.max {
            let at = utf8_boundary(&self.buf, self.max);
            let rest = self.buf.split_off(at);
            self.emit(LineEnd::Split, out);
            self.buf = rest;
            self.begin(boot_ns);
        }
    }

    fn emit(&mut self, end: LineEnd, out: &mut Vec<Line>) {
        out.push(Line {
            boot_ns: self.first_ns,
            bytes: std::mem::take(&mut self.buf),
            end,
        });
        self.begun = false;
    }
}

/// A cut point at or before `at` that does not split a UTF-8 sequence, when the bytes there
/// look like one (at most 3 bytes back); `at` otherwise.
fn utf8_boundary(bytes: &[u8], at: usize) -> usize {
    let is_continuation = |b: u8| b & 0xC0 == 0x80;
    let mut cut = at;
    while cut > at.saturating_sub(3) && cut > 1 && is_continuation(bytes[cut]) {
        cut -= 1;
    }
    if is_continuation(bytes[cut]) || cut == 0 {
        at
    } else {
        cut
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `writes` (time = index) and returns `(time, text, end)` of each line, then of the
    /// flush.
    fn run(max: usize, writes: &[(&[u8], u64)]) -> Vec<(u64, String, LineEnd)> {
        let mut a = LineAssembler::new(max);
        let mut out = Vec::new();
        for (i, (data, cut)) in writes.iter().enumerate() {
            a.push(i as u64, data, *cut, &mut out);
        }
        a.flush(&mut out);
        out.into_iter()
            .map(|l| {
                (
                    l.boot_ns,
                    String::from_utf8_lossy(&l.bytes).into_owned(),
                    l.end,
                )
            })
            .collect()
    }

    use LineEnd::*;

    #[test]
    fn table() {
        // (name, max line, writes with their cut, lines out with time and end)
        type Case<'a> = (
            &'a str,
            usize,
            Vec<(&'a [u8], u64)>,
            Vec<(u64, &'a str, LineEnd)>,
        );
        let cases: Vec<Case> = vec![
            ("one line", 16, vec![(b"a\n", 0)], vec![(0, "a", Newline)]),
            (
                "two in one write, empty line kept",
                16,
                vec![(b"a\n\nb\n", 0)],
                vec![(0, "a", Newline), (0, "", Newline), (0, "b", Newline)],
            ),
            (
                "partial writes join; time of the first",
                16,
                vec![(b"par", 0), (b"tial-", 0), (b"line\nx", 0)],
                vec![(0, "partial-line", Newline), (2, "x", Partial)],
            ),
            (
                "CRLF, bare CR, CRLF split across writes",
                16,
                vec![(b"a\r\nb\rc\r", 0), (b"\nd\n", 0)],
                vec![
                    (0, "a", Newline),
                    (0, "b", Newline),
                    (0, "c", Newline),
                    (1, "d", Newline),
                ],
            ),
            (
                "CR then other text in the next write",
                16,
                vec![(b"a\r", 0), (b"b\n", 0)],
                vec![(0, "a", Newline), (1, "b", Newline)],
            ),
            (
                "over-long line split at max",
                4,
                vec![(b"abcdefghij\n", 0)],
                vec![(0, "abcd", Split), (0, "efgh", Split), (0, "ij", Newline)],
            ),
            (
                "exactly max is not split",
                4,
                vec![(b"abcd\n", 0)],
                vec![(0, "abcd", Newline)],
            ),
            (
                "UTF-8 not split inside a character",
                4,
                vec![("abcé\n".as_bytes(), 0)],
                vec![(0, "abc", Split), (0, "é", Newline)],
            ),
            (
                "kernel cut ends the line, marked",
                16,
                vec![(b"xy", 0), (b"ab", 100), (b"z\n", 0)],
                vec![(0, "xyab", Cut(100)), (2, "z", Newline)],
            ),
            (
                "cut of a write that ended a line gives an empty cut line",
                16,
                vec![(b"a\n", 5)],
                vec![(0, "a", Newline), (0, "", Cut(5))],
            ),
            (
                "NUL and invalid UTF-8 bytes are content",
                16,
                vec![(b"a\0b\xff\n", 0)],
                vec![(0, "a\0b\u{fffd}", Newline)],
            ),
            ("nothing to flush", 16, vec![(b"", 0)], vec![]),
        ];
        for (name, max, writes, want) in cases {
            let got = run(max, &writes);
            let want: Vec<(u64, String, LineEnd)> = want
                .into_iter()
                .map(|(t, s, e)| (t, s.to_owned(), e))
                .collect();
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn megabyte_line_in_4k_writes() {
        let mut a = LineAssembler::new(16 * 1024);
        let mut out = Vec::new();
        let chunk = vec![b'x'; 4096];
        for i in 0..256 {
            a.push(i, &chunk, 0, &mut out);
        }
        assert_eq!(out.len(), 63);
        assert!(out.iter().all(|l| l.end == Split && l.bytes.len() == 16384));
        assert_eq!(a.pending(), 16384);
        a.flush(&mut out);
        assert_eq!(out.last().unwrap().end, Partial);
        let total: usize = out.iter().map(|l| l.bytes.len()).sum();
        assert_eq!(total, 1 << 20);
    }
}

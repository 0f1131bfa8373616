//! File-system names for instance ids. An id comes from a command line, so it is hostile until
//! proven otherwise: the name keeps `[A-Za-z0-9_-]` and `.` (not first), and writes every other
//! byte as `%XX`, so it can never be `.`, `..`, hidden, or hold a `/`, a NUL or a control
//! character. Distinct ids give distinct names (`%` itself is encoded); very long ones are cut
//! and end in a hash of the whole id.

use std::fmt::Write;

/// Longest name produced (file systems allow 255 bytes).
const MAX_NAME: usize = 200;

pub(crate) fn dir_name(id: &str) -> String {
    let mut name = String::with_capacity(id.len());
    for (i, b) in id.bytes().enumerate() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || (b == b'.' && i > 0) {
            name.push(b as char);
        } else {
            let _ = write!(name, "%{b:02X}");
        }
    }
    if name.is_empty() {
        return "%".to_owned();
    }
    if name.len() > MAX_NAME {
        let mut cut = MAX_NAME - 17;
        // Do not end inside a %XX escape.
        while name.as_bytes()[cut - 1] == b'%' || name.as_bytes()[cut - 2] == b'%' {
            cut -= 1;
        }
        name.truncate(cut);
        let _ = write!(name, "~{:016x}", fnv1a(id.as_bytes()));
    }
    name
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_ids() {
        let cases = [
            (
                "7d2b1a38-8f5c-4a4e-9d7e-2f0b6c1d9e11",
                "7d2b1a38-8f5c-4a4e-9d7e-2f0b6c1d9e11",
            ),
            ("vm_1.a", "vm_1.a"),
            ("..", "%2E."),
            (".", "%2E"),
            ("../../etc", "%2E.%2F..%2Fetc"),
            ("/etc/passwd", "%2Fetc%2Fpasswd"),
            ("a\u{1}b\tc", "a%01b%09c"),
            ("100%", "100%25"),
            ("é", "%C3%A9"),
            ("", "%"),
        ];
        for (id, want) in cases {
            assert_eq!(dir_name(id), want, "{id:?}");
        }
    }

    #[test]
    fn long_ids_are_cut_and_stay_distinct() {
        let a = dir_name(&"/".repeat(300));
        let b = dir_name(&format!("{}x", "/".repeat(299)));
        assert!(a.len() <= MAX_NAME && b.len() <= MAX_NAME, "{a}");
        assert_ne!(a, b);
        assert!(!a.contains('/'));
        let (head, _) = a.split_once('~').unwrap();
        assert!(head.ends_with("%2F"), "{head}");
    }
}

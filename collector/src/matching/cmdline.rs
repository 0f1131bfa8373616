//! Command lines: the NUL-separated form the kernel and `/proc` give, and flag values in them.

/// The value of the first of `flags` in `args`: `--flag value` or `--flag=value`.
pub(crate) fn flag_value(args: &[String], flags: &[&str]) -> Option<String> {
    let mut iter = args.iter().skip(1);
    while let Some(arg) = iter.next() {
        for flag in flags {
            if arg == flag {
                return iter.next().cloned();
            }
            if let Some(value) = arg.strip_prefix(flag).and_then(|v| v.strip_prefix('=')) {
                return Some(value.to_owned());
            }
        }
    }
    None
}

/// QEMU's `-name guest=<name>,process=...,debug-threads=on` or `-name <name>`.
pub(crate) fn qemu_guest_name(value: &str) -> Option<String> {
    let first = value.split(',').next()?;
    let name = first.strip_prefix("guest=").unwrap_or(first);
    // `-name debug-threads=on` alone names nothing.
    (!name.contains('=')).then(|| name.to_owned())
}

/// Splits a NUL-separated command line (as in `/proc/PID/cmdline` or the exec event).
pub(crate) fn split_cmdline(raw: &[u8]) -> Vec<String> {
    let raw = raw.strip_suffix(&[0]).unwrap_or(raw);
    if raw.is_empty() {
        return Vec::new();
    }
    raw.split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_splitting() {
        assert_eq!(split_cmdline(b"a\0b c\0\0d\0"), vec!["a", "b c", "", "d"]);
        assert!(split_cmdline(b"").is_empty());
        assert_eq!(split_cmdline(b"\xff\0"), vec!["\u{fffd}"]);
    }

    #[test]
    fn flag_forms() {
        let args: Vec<String> = ["vmm", "--a", "1", "--b=2", "--c"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        assert_eq!(flag_value(&args, &["--a"]).as_deref(), Some("1"));
        assert_eq!(flag_value(&args, &["--b"]).as_deref(), Some("2"));
        assert_eq!(flag_value(&args, &["--c"]), None);
        assert_eq!(flag_value(&args, &["vmm"]), None, "argv[0] is not a flag");
    }
}

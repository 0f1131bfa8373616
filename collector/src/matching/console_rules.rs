//! Console-file rules: which files a VMM opens are its guest console.
//!
//! A rule is a glob of the form `*SUFFIX` per matcher. The kernel applies it at `open` (it
//! cannot wait for userspace: the first write may follow at once), comparing the literal
//! suffix with the end of the path the VMM passed; userspace applies the same test to the
//! targets of `/proc/PID/fd` for descriptors opened before the collector saw the process.

use collector_common::{CONSOLE_MAX_RULES, CONSOLE_RULE_LEN, ConsoleRule};

use super::Matchers;

/// A rule, resolved to its matcher's index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rule {
    pub(crate) matcher_id: u32,
    pub(crate) suffix: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum RuleError {
    #[error("console.files: no matcher named {0:?}")]
    UnknownMatcher(String),
    #[error(
        "console.files: {0:?} must be `*` followed by a literal suffix (no other wildcard) of \
         1 to {max} bytes: the kernel compares it at open",
        max = CONSOLE_RULE_LEN - 1
    )]
    Shape(String),
    #[error("console.files: more than {CONSOLE_MAX_RULES} rules")]
    TooMany,
}

/// Resolves the configured rules against the matchers in force.
pub(crate) fn resolve<'a>(
    files: impl IntoIterator<Item = (&'a String, &'a Vec<String>)>,
    matchers: &Matchers,
) -> Result<Vec<Rule>, RuleError> {
    let mut rules = Vec::new();
    for (name, globs) in files {
        let matcher_id = matchers
            .iter()
            .position(|m| &m.name == name)
            .ok_or_else(|| RuleError::UnknownMatcher(name.clone()))?;
        for glob in globs {
            let suffix = glob
                .strip_prefix('*')
                .filter(|s| {
                    !s.is_empty() && s.len() < CONSOLE_RULE_LEN && !s.contains(['*', '?', '['])
                })
                .ok_or_else(|| RuleError::Shape(glob.clone()))?;
            rules.push(Rule {
                matcher_id: matcher_id as u32,
                suffix: suffix.as_bytes().to_vec(),
            });
        }
    }
    if rules.len() > CONSOLE_MAX_RULES as usize {
        return Err(RuleError::TooMany);
    }
    Ok(rules)
}

impl Rule {
    /// The kernel's form of the rule.
    pub(crate) fn to_kernel(&self) -> ConsoleRule {
        let mut suffix = [0u8; CONSOLE_RULE_LEN];
        suffix[..self.suffix.len()].copy_from_slice(&self.suffix);
        ConsoleRule {
            matcher_id: self.matcher_id,
            len: self.suffix.len() as u32,
            suffix,
        }
    }

    /// The kernel's test (`collector-ebpf/src/console.rs`, `ends_with`), on a path.
    pub(crate) fn matches(&self, path: &[u8]) -> bool {
        path.ends_with(&self.suffix)
            || (self.suffix.first() == Some(&b'/') && path == &self.suffix[1..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn rules(files: &[(&str, &[&str])]) -> Result<Vec<Rule>, RuleError> {
        let files: BTreeMap<String, Vec<String>> = files
            .iter()
            .map(|(m, g)| (m.to_string(), g.iter().map(ToString::to_string).collect()))
            .collect();
        resolve(&files, &Matchers::builtins())
    }

    #[test]
    fn shapes() {
        let r = rules(&[("firecracker", &["*/vm.log"]), ("qemu", &["*.serial"])]).unwrap();
        assert_eq!(r[0].matcher_id, 0);
        assert_eq!(r[0].suffix, b"/vm.log");
        assert_eq!(r[1].matcher_id, 1);
        assert_eq!(r[0].to_kernel().len, 7);
        for bad in ["vm.log", "*", "*/a*b", "*/x?", "**"] {
            assert_eq!(
                rules(&[("qemu", &[bad])]),
                Err(RuleError::Shape(bad.into())),
                "{bad}"
            );
        }
        let long = format!("*/{}", "x".repeat(63));
        assert!(matches!(
            rules(&[("qemu", &[long.as_str()])]),
            Err(RuleError::Shape(_))
        ));
        assert_eq!(
            rules(&[("crosvm", &["*/a"])]),
            Err(RuleError::UnknownMatcher("crosvm".into()))
        );
        let many: Vec<&str> = vec!["*/a"; 17];
        assert_eq!(rules(&[("qemu", &many)]), Err(RuleError::TooMany));
    }

    #[test]
    fn matching_like_the_kernel() {
        let r = &rules(&[("firecracker", &["*/vm.log"])]).unwrap()[0];
        let platform = b"/var/lib/ukp/data/platform/7d2b1a38-8f5c-4a4e-9d7e-2f0b6c1d9e11/vm.log";
        assert!(r.matches(platform));
        assert!(r.matches(b"vm.log"), "relative bare name");
        assert!(r.matches(b"./vm.log"));
        assert!(!r.matches(b"myvm.log"));
        assert!(!r.matches(b"/x/vm.log.1"));
        assert!(!r.matches(b"m.log"));
    }
}

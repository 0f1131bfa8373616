//! Which processes are hypervisors and which instance each runs: matchers, command-line and
//! allocation parsing, console-file rules, and the plan the kernel programs are loaded with
//! (so that the kernel layer needs no matcher).

pub(crate) mod allocation;
pub(crate) mod cmdline;
pub(crate) mod console_rules;
pub(crate) mod matcher;

use collector_common::{COMM_LEN, ConsoleRule};

pub(crate) use cmdline::split_cmdline;
use console_rules::Rule;
use matcher::{Matcher, MatcherError};

use crate::config::Config;

/// Longest instance id accepted as is.
pub(crate) const MAX_INSTANCE_ID_LEN: usize = 128;

/// The matchers in force: built-ins not turned off, then the config file's, in that order (a
/// matcher's index is its id in the kernel's maps).
#[derive(Debug, Clone)]
pub(crate) struct Matchers {
    list: Vec<Matcher>,
}

/// A process a matcher claimed, and the instance id its command line gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Identified {
    pub(crate) matcher: usize,
    pub(crate) instance_uuid: String,
    /// Why the command line gave no usable id (the id is then made up from the pid), as a
    /// bounded label value; the offending id, escaped, for the log line.
    pub(crate) problem: Option<(&'static str, Option<String>)>,
}

/// Why a matched process got a made-up instance id (a bounded label value).
fn id_problem(id: Option<&str>) -> Option<&'static str> {
    match id {
        None => Some("no_instance_id"),
        Some(id) if id.len() > MAX_INSTANCE_ID_LEN => Some("instance_id_too_long"),
        Some(id) if id.chars().any(char::is_control) => Some("instance_id_control_chars"),
        Some(id) if !is_path_safe(id) => Some("instance_id_unsafe"),
        Some(_) => None,
    }
}

/// Whether `id` can stand in a path (`instance_dir`): no `/`, no `..`, no NUL.
pub(crate) fn is_path_safe(id: &str) -> bool {
    !(id.contains('/') || id.contains("..") || id.contains('\0'))
}

impl Matchers {
    /// The matchers `config` puts in force.
    pub(crate) fn from_config(config: &Config) -> Result<Self, MatcherError> {
        let mut list: Vec<Matcher> = Matcher::builtins()
            .into_iter()
            .filter(|m| !config.disable_builtin_matchers.contains(&m.name))
            .map(|mut m| {
                m.trusted_executable_dirs
                    .clone_from(&config.trusted_executable_dirs);
                m
            })
            .collect();
        for custom in &config.matchers {
            let mut matcher = Matcher::from_config(custom)?;
            matcher.trusted_executable_dirs = config
                .trusted_executable_dirs
                .iter()
                .chain(&custom.trusted_executable_dirs)
                .cloned()
                .collect();
            list.push(matcher);
        }
        Ok(Self { list })
    }

    /// The built-in matchers alone.
    #[cfg(test)]
    pub(crate) fn builtins() -> Self {
        Self {
            list: Matcher::builtins(),
        }
    }

    pub(crate) fn get(&self, index: usize) -> Option<&Matcher> {
        self.list.get(index)
    }

    pub(crate) fn by_name(&self, name: &str) -> Option<&Matcher> {
        self.list.iter().find(|m| m.name == name)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Matcher> {
        self.list.iter()
    }

    pub(crate) fn len(&self) -> usize {
        self.list.len()
    }

    /// The `hypervisor` label values of the matchers, for series pre-set at 0.
    pub(crate) fn hypervisors(&self) -> Vec<String> {
        let mut hypervisors: Vec<String> = self.list.iter().map(|m| m.hypervisor.clone()).collect();
        hypervisors.sort();
        hypervisors.dedup();
        hypervisors
    }

    /// Names the instance of process `pid` running `executable` with `args`, if a matcher
    /// claims it. An unusable id is replaced by `unidentified-pid-<pid>`, and the problem said.
    pub(crate) fn identify(
        &self,
        executable: &str,
        args: &[String],
        pid: u32,
    ) -> Option<Identified> {
        let (index, matcher) = self
            .list
            .iter()
            .enumerate()
            .find(|(_, m)| m.matches_executable(executable))?;
        let id = matcher.instance_id(args);
        Some(match id_problem(id.as_deref()) {
            None => Identified {
                matcher: index,
                instance_uuid: id.expect("checked"),
                problem: None,
            },
            Some(reason) => Identified {
                matcher: index,
                instance_uuid: format!("unidentified-pid-{pid}"),
                problem: Some((reason, id.map(|s| s.escape_debug().to_string()))),
            },
        })
    }

    /// What the kernel programs are loaded with: the exec `comm` prefixes, the vCPU thread-name
    /// prefixes, and the console-file rules.
    pub(crate) fn kernel_plan(&self, console_rules: &[Rule]) -> KernelPlan {
        let exec_prefixes = self
            .list
            .iter()
            .enumerate()
            .map(|(id, m)| {
                let prefix = m.comm_prefix().expect("matchers are checked when built");
                (id as u32, prefix.bytes, prefix.len)
            })
            .collect();
        let mut vcpu_prefixes = Vec::new();
        let mut without_vcpu_prefix = Vec::new();
        for (id, m) in self.list.iter().enumerate() {
            let prefixes = m.vcpu_comm_prefixes();
            if prefixes.is_empty() {
                without_vcpu_prefix.push(m.name.clone());
            }
            vcpu_prefixes.extend(prefixes.into_iter().map(|p| (id as u32, p)));
        }
        KernelPlan {
            exec_prefixes,
            vcpu_prefixes,
            without_vcpu_prefix,
            console_rules: console_rules.iter().map(Rule::to_kernel).collect(),
        }
    }
}

/// The matchers and rules in the form the kernel maps take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KernelPlan {
    /// `(matcher id, comm bytes, significant length)`: the exec trie's entries.
    pub(crate) exec_prefixes: Vec<(u32, [u8; COMM_LEN], usize)>,
    /// `(matcher id, literal prefix)`: the vCPU thread-name trie's entries.
    pub(crate) vcpu_prefixes: Vec<(u32, Vec<u8>)>,
    /// Matchers whose vCPU pattern has no literal start (their late-named threads count as
    /// `vmm`), for a warning at load.
    pub(crate) without_vcpu_prefix: Vec<String>,
    pub(crate) console_rules: Vec<ConsoleRule>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_ids() {
        assert_eq!(
            id_problem(Some("7d2b1a38-8f5c-4a4e-9d7e-2f0b6c1d9e11")),
            None
        );
        assert_eq!(id_problem(None), Some("no_instance_id"));
        assert_eq!(
            id_problem(Some(&"x".repeat(200))),
            Some("instance_id_too_long")
        );
        assert_eq!(id_problem(Some("a\nb")), Some("instance_id_control_chars"));
        for unsafe_id in ["../../proc/1/root/tmp/d", "a/b", "..", "x..y"] {
            assert_eq!(
                id_problem(Some(unsafe_id)),
                Some("instance_id_unsafe"),
                "{unsafe_id}"
            );
        }
        assert_eq!(id_problem(Some("a\0b")), Some("instance_id_control_chars"));
        assert_eq!(id_problem(Some("vm.1")), None);
    }

    #[test]
    fn identify_and_plan() {
        let m = Matchers::builtins();
        let args: Vec<String> = ["firecracker", "--uuid", "u-1"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        let found = m.identify("/usr/bin/firecracker", &args, 7).unwrap();
        assert_eq!((found.matcher, found.instance_uuid.as_str()), (0, "u-1"));
        let unnamed = m.identify("/usr/bin/firecracker", &args[..1], 7).unwrap();
        assert_eq!(unnamed.instance_uuid, "unidentified-pid-7");
        assert_eq!(unnamed.problem.unwrap().0, "no_instance_id");
        assert!(m.identify("/usr/bin/bash", &args, 7).is_none());
        let plan = m.kernel_plan(&[]);
        assert_eq!(plan.exec_prefixes.len(), 3);
        assert_eq!(
            &plan.exec_prefixes[0].1[..plan.exec_prefixes[0].2],
            b"firecracker\0"
        );
        assert!(
            plan.vcpu_prefixes
                .iter()
                .any(|(id, p)| *id == 1 && p == b"CPU ")
        );
        assert!(plan.without_vcpu_prefix.is_empty());
    }
}
